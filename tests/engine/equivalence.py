"""Run a workload through an engine step by step and compare every output with HF greedy."""

from __future__ import annotations

from baton_paged.engine import Engine
from baton_paged.sampling_params import SamplingParams

FORWARD_PATHS = {
    "fast": {"model_impl": "auto", "attention_backend": "auto"},
    "general": {"model_impl": "transformers", "attention_backend": "torch"},
}
"""fast: what an engine picks by default; general: the HF model through the bridge on the plain
torch backend, the path every model and machine has."""


def run(engine: Engine, workload) -> dict[str, tuple[int, ...]]:
    """Add each ``(prompt, max_tokens, arrival iteration[, priority])`` request when it arrives;
    step until all finish, checking the pools after every step."""
    done: dict[str, tuple[int, ...]] = {}
    step = 0
    while len(done) < len(workload):
        for i, (prompt, max_tokens, arrival, *priority) in enumerate(workload):
            if arrival == step:
                params = SamplingParams(temperature=0, max_tokens=max_tokens)
                prompt = {"prompt_token_ids": list(prompt)}
                engine.add_request(prompt, params, request_id=str(i), priority=sum(priority))
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output.outputs[0].token_ids
        engine.scheduler.check_integrity()
        step += 1
        assert step < 2000, "the engine stopped making progress"
    return done


def check(engine, workload, reference, arch):
    """Run ``workload`` to the end; every output equals HF greedy and every page is back."""
    done = run(engine, workload)
    for i, (prompt, max_tokens, *_) in enumerate(workload):
        assert done[str(i)] == reference(arch, prompt, max_tokens), f"request {i}"
    assert engine.cache.pool.num_used == 0 and not engine.scheduler.has_work()
    assert not engine.requests
