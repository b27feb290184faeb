"""lm-eval, as a vLLM user points it at a server: its ``local-completions`` model against this
server, and its ``hf`` model on the same checkpoint, over a small local multiple-choice task
(log-likelihoods: list prompts, ``echo`` + ``logprobs``, the scored prompt) and a generation
task (greedy ``generate_until`` with a stop string). lm-eval tokenizes through the server's
``/tokenizer_info`` and ``/tokenize``, as it does against vLLM. The log-likelihoods agree to float
tolerance, every answer and accuracy is the same, and so is every generated text."""

from __future__ import annotations

import json

import pytest
from serving import KEY, MODEL, serving

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the test extra")

CHOICE_TASK = """task: baton_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
GENERATE_TASK = """task: baton_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
"""
TASKS = ["baton_choice", "baton_generate"]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval-tasks")
    words = ["apple", "blue sky", "the end", "zero", "river", "a cat sat"]
    docs = [
        {
            "question": f"Question {i}: what comes after {words[i % 6]}?",
            "choices": [words[(i + k) % 6] for k in range(4)],
            "answer": i % 4,
        }
        for i in range(12)
    ]
    data = root / "docs.jsonl"
    data.write_text("\n".join(json.dumps(doc) for doc in docs))
    (root / "choice.yaml").write_text(CHOICE_TASK.format(data=data))
    (root / "generate.yaml").write_text(GENERATE_TASK.format(data=data))
    return root


def evaluate(model: str, model_args: dict, task_dir, **options) -> dict:
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir))
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=TASKS, task_manager=manager,
        log_samples=True, **options,
    )  # fmt: skip


def responses(result: dict, task: str) -> list:
    """Per document: the choices' log-likelihoods, or the generated text."""
    samples = sorted(result["samples"][task], key=lambda sample: sample["doc_id"])
    return [
        [resp if isinstance(resp, str) else resp[0] for resp in sample["filtered_resps"]]
        for sample in samples
    ]


def test_lm_eval_agrees_with_its_hf_model(tiny_model_dir, task_dir, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tiny_model_dir("llama")
    with serving(path, tokenizer_info=True) as server:  # lm-eval tokenizes through it
        args = {
            "model": MODEL, "base_url": f"{server.url}/v1/completions", "batch_size": 4,
            "max_retries": 1,
        }  # fmt: skip
        served = evaluate("local-completions", args, task_dir)
    hf_args = {"pretrained": str(path), "dtype": "float64", "device": "cpu"}
    reference = evaluate("hf", hf_args, task_dir, batch_size=4)

    served_scores = responses(served, "baton_choice")
    assert len(served_scores) == 12
    for ours, theirs in zip(served_scores, responses(reference, "baton_choice"), strict=True):
        assert ours == pytest.approx(theirs, abs=1e-6)
        assert ours.index(max(ours)) == theirs.index(max(theirs))
    for task, metric in (("baton_choice", "acc,none"), ("baton_generate", "exact_match,none")):
        assert served["results"][task][metric] == reference["results"][task][metric]
    generated = responses(served, "baton_generate")
    assert generated == responses(reference, "baton_generate")
    assert sum(bool(text.strip()) for (text,) in generated) >= 6, generated
