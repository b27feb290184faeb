"""Structured outputs: what a JSON-schema constraint costs a decode step, and what a compile costs.

    python benchmarks/bench_structured.py [--model default|smollm2|small] [--batch 32]
        [--repeats 3] [--threads 2] [--device cpu|cuda] [--quick]

Throughput: B requests decode together (the default model, SmolLM2-135M-Instruct, with its real
49,152-token vocabulary: the mask's cost grows with it), greedy, prompts of a chat asking for a
JSON record; in the ``half`` run every other request carries a JSON schema whose one string field
needs 400 characters, so no constrained request completes within the measured steps. Timed:
decode steps while all B requests run (the prefill and first decode excluded), as tokens per
second; ``none`` and ``half`` alternate, ``--repeats`` times each, a fresh engine per run.
Target: ``half`` >= 0.9x ``none`` (overhead <= 10%).

Compile: a typical schema (an object of six typed fields, an enum, a nested array) compiled
against the model's tokenizer: the first compile in a process (which builds llguidance's view of
the tokenizer once), a new schema after it, and a cached one (a copy of the compiled matcher).
Results: ``results/structured-<device>.*``.
"""

from __future__ import annotations

import time

import harness
import torch
from harness import Default, check

from baton_paged import LLM, SamplingParams, StructuredOutputsParams
from baton_paged.model.builder import cached_model, default_model

LONG_TEXT = {
    "type": "object",
    "properties": {"summary": {"type": "string", "minLength": 400, "maxLength": 600}},
    "required": ["summary"],
    "additionalProperties": False,
}
"""The constrained rows' schema: it cannot complete within the measured steps."""
TYPICAL = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string", "format": "email"},
        "active": {"type": "boolean"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city"],
        },
    },
    "required": ["name", "age", "role"],
}
PROMPT = [{"role": "user", "content": "Describe a person as a JSON record."}]


def model_path(name: str) -> str:
    return str(default_model() if name == "default" else cached_model("llama", name))


def measure(llm: LLM, batch: int, constrained: bool, steps: int, device) -> dict:
    engine = llm.engine
    prompt = llm.get_tokenizer().apply_chat_template(
        PROMPT, add_generation_prompt=True, tokenize=False
    )
    spec = StructuredOutputsParams(json=LONG_TEXT)
    for i in range(batch):
        structured = spec if constrained and i % 2 else None
        params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True,
                                structured_outputs=structured)  # fmt: skip
        engine.add_request(prompt, params)
    sync = harness.synchronizer(device)
    while engine.snapshot.num_waiting or engine.snapshot.num_running < batch:
        engine.step()
    engine.step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
        sync()
    seconds = time.perf_counter() - start
    assert engine.snapshot.num_running == batch, "a request finished inside the measured steps"
    for request_id in list(engine.requests):
        engine.abort_request(request_id)
    return {"tok_s": round(steps * batch / seconds, 1)}


def compile_times(llm: LLM) -> dict:
    grammars = llm.engine.inputs.grammars
    first = time.perf_counter()
    grammars.matcher(StructuredOutputsParams(json=TYPICAL))
    cold = time.perf_counter() - first
    other = dict(TYPICAL, required=["name", "age", "role", "active"])
    start = time.perf_counter()
    grammars.matcher(StructuredOutputsParams(json=other))
    warm = time.perf_counter() - start
    start = time.perf_counter()
    grammars.matcher(StructuredOutputsParams(json=other))
    cached = time.perf_counter() - start
    return {
        "first_compile_ms": round(cold * 1e3, 2),
        "new_schema_ms": round(warm * 1e3, 2),
        "cached_ms": round(cached * 1e3, 3),
    }


def report(saved: dict) -> tuple[list[str], str, harness.Panels]:
    lines = [
        f"# Structured outputs at B={saved['batch']} ({saved['model']}, "
        f"{saved['environment']['device']})",
        "",
        *harness.markdown(saved["runs"]),
        "",
        f"half constrained / none: {saved['ratio']}x",
        "",
        *harness.markdown([saved["compile"]]),
    ]
    runs = saved["runs"]
    panel = (list(range(len(runs))), {"tok/s": [r["tok_s"] for r in runs]})
    return lines, "Decode throughput with half the rows under a JSON schema", {"runs": panel}


def main() -> None:
    parser = harness.options(
        __doc__, threads=2, repeats=Default(3, 1), quick="one repeat", results="structured-cpu"
    )
    parser.add_argument("--model", default="default", choices=("default", "smollm2", "small"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=Default(48, 12))
    parser.add_argument("--device", default="cpu")
    args = harness.start(parser)
    device = torch.device(args.device)
    path = model_path(args.model)
    runs = []
    for _, constrained in harness.rotations([False, True], args.repeats):
        with LLM(path, max_batch_size=args.batch, device=args.device, max_model_len=1024) as llm:
            row = measure(llm, args.batch, constrained, args.steps, device)
        runs.append({"constrained": "half" if constrained else "none", **row})
        print(runs[-1], flush=True)
    with LLM(path, max_batch_size=args.batch, device=args.device, max_model_len=1024) as llm:
        compiled = compile_times(llm)
    print(compiled, flush=True)
    none = harness.median(r["tok_s"] for r in runs if r["constrained"] == "none")
    half = harness.median(r["tok_s"] for r in runs if r["constrained"] == "half")
    ratio = round(half / none, 3)
    payload = {
        "model": args.model,
        "batch": args.batch,
        "environment": harness.environment(args.threads, device),
        "runs": runs,
        "ratio": ratio,
        "compile": compiled,
        "checks": [check("half constrained / none, tok/s", ratio, 0.9, ">=")],
    }
    harness.publish(args.name.replace("-cpu", f"-{device.type}"), payload, report, [])


if __name__ == "__main__":
    main()
