"""A script written for vLLM's offline API runs here with only its import changed, and vLLM's
engine arguments mean what they mean there (or are refused by name)."""

from __future__ import annotations

import logging

import pytest

from baton_paged import LLM, SamplingParams
from baton_paged.entrypoints.vllm_args import engine_options
from baton_paged.processing.chat_prompt import conversation_prompt

VLLM_SCRIPT = """
from vllm import LLM, SamplingParams

llm = LLM(model=MODEL, max_num_seqs=16, gpu_memory_utilization=0.5, enforce_eager=True, seed=0,
          dtype="float32", max_model_len=256, trust_remote_code=False)
prompts = ["Hello, my name is", "The capital of France is", "The future of AI is"]
params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=8)
outputs = llm.generate(prompts, params, use_tqdm=True)
for output in outputs:
    print(output.prompt, "->", output.outputs[0].text)

conversation = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
]
chat = llm.chat(conversation, SamplingParams(temperature=0, max_tokens=8))
many = llm.chat([conversation, conversation[1:]], SamplingParams(temperature=0, max_tokens=4))

penalised = SamplingParams(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2,
                           temperature=0, max_tokens=8)
both = SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=8, min_p=0.05,
                      logit_bias={42: 2.0}, logprobs=2, prompt_logprobs=1)
results = llm.generate(["Once upon a time"], [penalised]) + llm.generate("Once upon a time", both)
"""


def test_vllm_script_runs_with_only_the_import_changed(tiny_model_dir, capsys):
    script = VLLM_SCRIPT.replace("from vllm import", "from baton_paged import")
    scope = {"MODEL": str(tiny_model_dir("llama"))}
    exec(compile(script, "vllm_script", "exec"), scope)  # noqa: S102 - our own test script
    assert len(scope["outputs"]) == 3 and "Processed prompts" in capsys.readouterr().err
    assert len(scope["chat"]) == 1 and len(scope["many"]) == 2
    penalised, sampled = scope["results"]
    assert len(penalised.outputs) == 1 and len(sampled.outputs) == 2
    assert [c.index for c in sampled.outputs] == [0, 1]
    tokenizer = scope["llm"].get_tokenizer()
    for completion in sampled.outputs:
        for entry in completion.logprobs:
            assert all(lp.decoded_token == tokenizer.decode([t]) for t, lp in entry.items())
    assert sampled.prompt_logprobs[0] is None and len(sampled.prompt_logprobs) > 1
    engine = scope["llm"].engine
    assert engine.config.max_batch_size == 16 and engine.config.enforce_eager


def test_chat_uses_the_template_and_refuses_images(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")))
    (out,) = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=2),
                      use_tqdm=False)  # fmt: skip
    tokenizer = llm.get_tokenizer()
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert out.prompt == expected and "Hi" in expected
    assert list(out.prompt_token_ids) == tokenizer.encode(expected, add_special_tokens=False)
    image = [{"type": "image_url", "image_url": {"url": "data:"}}]
    with pytest.raises(ValueError, match="'image_url' are not supported"):
        llm.chat([{"role": "user", "content": image}])
    assert not llm.engine.requests


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"max_num_seqs": 8}, {"max_batch_size": 8}),
        ({"block_size": 32, "swap_space": 2}, {"page_size": 32, "swap_memory": "2GiB"}),
        ({"dtype": "half"}, {"dtype": "float16"}),
        ({"dtype": "auto"}, {"dtype": "auto"}),
        ({"gpu_memory_utilization": 0.5, "device": "cuda"}, {"kv_memory": "0.5", "device": "cuda"}),
        ({"tensor_parallel_size": 1, "trust_remote_code": False, "seed": 3}, {"seed": 3}),
        ({"enable_prefix_caching": False}, {"enable_prefix_caching": False}),
        (
            {"max_model_len": 128, "enforce_eager": True},
            {"max_model_len": 128, "enforce_eager": True},
        ),
    ],
)
def test_vllm_engine_arguments_translate(options, expected):
    assert engine_options(options) == expected


def test_gpu_memory_utilization_on_the_cpu_keeps_kv_memory_and_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="baton_paged.entrypoints.vllm_args"):
        assert engine_options({"gpu_memory_utilization": 0.9}) == {}
    assert "kv_memory sizes KV" in caplog.text


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tensor_parallel_size": 2}, "tensor_parallel_size=2 is not supported"),
        ({"trust_remote_code": True}, "trust_remote_code=True is not supported"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization must be in"),
        ({"speculative_config": {}}, "unknown engine argument 'speculative_config'"),
    ],
)
def test_unsupported_engine_arguments_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        engine_options(options)


def test_conversation_without_a_template_is_plain_role_lines():
    class Plain:
        chat_template = None

        def encode(self, text, add_special_tokens=True):
            assert not add_special_tokens
            return [len(text)]

    messages = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}]
    prompt = conversation_prompt(Plain(), messages)
    assert prompt == {"prompt": "system: Be brief\nuser: Hi\nassistant:", "prompt_token_ids": [36]}
    with pytest.raises(ValueError, match="exclude each other"):
        conversation_prompt(Plain(), messages, continue_final_message=True)
    with pytest.raises(ValueError, match="at least one message"):
        conversation_prompt(Plain(), [])


def test_prompt_types_and_unknown_prompt_keys(tiny_model_dir):
    from baton_paged import TextPrompt, TokensPrompt

    llm = LLM(str(tiny_model_dir("llama")), max_model_len=64, kv_memory="16MiB",
              swap_memory="16MiB")  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=3)
    ids = llm.get_tokenizer().encode("def main():")
    by_text, by_ids = llm.generate(
        [TextPrompt(prompt="def main():"), TokensPrompt(prompt_token_ids=ids)], params
    )
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids
    image = {"prompt": "describe", "multi_modal_data": {"image": object()}}
    with pytest.raises(ValueError, match="multi_modal_data"):
        llm.generate([image], params)
    assert not llm.engine.requests


def test_get_metrics_reads_what_generate_served(tiny_model_dir):
    from baton_paged.metrics_reader import Counter, Gauge, Histogram

    llm = LLM(str(tiny_model_dir("llama")), max_model_len=64, kv_memory="16MiB",
              swap_memory="16MiB")  # fmt: skip
    outputs = llm.generate(["a", "bc", "def"], SamplingParams(max_tokens=4, ignore_eos=True))
    metrics = {m.name: m for m in llm.get_metrics()}
    generated = metrics["vllm:generation_tokens_total"]
    assert isinstance(generated, Counter) and generated.value == 12
    assert generated.labels == {"model_name": tiny_model_dir("llama").name}
    e2e = metrics["vllm:e2e_request_latency_seconds"]
    assert isinstance(e2e, Histogram) and e2e.count == 3 and e2e.buckets["+Inf"] == 3
    prompts = metrics["vllm:request_prompt_tokens"]
    assert prompts.sum == sum(len(o.prompt_token_ids) for o in outputs)
    running = metrics["vllm:num_requests_running"]
    assert isinstance(running, Gauge) and running.value == 0
    assert metrics["baton:iterations_total"].value > 0
    assert all(o.num_cached_tokens == 0 for o in outputs)


def test_the_built_in_model_is_served_under_its_hub_id():
    from baton_paged.entrypoints.model_id import served_model_names

    assert served_model_names(None) == [
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "baton-paged-default",
    ]
    assert served_model_names("org/name") == ["org/name"]
    assert served_model_names(None, ["mine"]) == ["mine"]


@pytest.fixture
def model_with_sampling_defaults(tiny_model_dir, tmp_path):
    """The tiny checkpoint, its generation config recommending sampling settings."""
    import shutil

    from transformers import GenerationConfig

    path = tmp_path / "with-defaults"
    shutil.copytree(tiny_model_dir("llama"), path)
    config = GenerationConfig.from_pretrained(path)
    config.update(
        do_sample=True, temperature=0.5, top_k=5, max_new_tokens=7, repetition_penalty=1.3
    )
    config.save_pretrained(path)
    return path


def test_the_generation_config_sets_the_defaults_as_vllm(model_with_sampling_defaults):
    options = {"max_model_len": 64, "kv_memory": "16MiB", "swap_memory": "16MiB"}
    llm = LLM(str(model_with_sampling_defaults), **options)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_k, defaults.max_tokens) == (0.5, 5, 7)
    assert defaults.repetition_penalty == 1.3 and defaults.top_p == 1.0
    (out,) = llm.generate(["hi"], SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 3  # given params are used as they are
    (out,) = llm.generate(["hi"])
    assert len(out.outputs[0].token_ids) <= 7
    plain = LLM(str(model_with_sampling_defaults), generation_config="vllm", **options)
    assert plain.get_default_sampling_params() == SamplingParams()
    elsewhere = LLM(str(plain.engine.config.model), generation_config=str(
        model_with_sampling_defaults), **options)  # fmt: skip
    assert elsewhere.get_default_sampling_params().top_k == 5
