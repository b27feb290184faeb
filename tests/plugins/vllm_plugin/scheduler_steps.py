"""Driving a hand-built vLLM scheduler without a model: requests added directly, steps faked.

Shared by the scheduler and mirror tests (imported as a plain module: pytest puts this folder on
sys.path). It imports vLLM, so import it only after ``pytest.importorskip("vllm")``.
"""

from __future__ import annotations

from vllm import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request


def add(scheduler, request_id, prompt_len, priority=0, arrival=0.0, max_tokens=16, resumable=False):
    """Add a request; ``resumable`` makes it a streaming-input session (adding its id again
    sends the session's next chunk). Ids of the same length get the same prompt tokens."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    prompt = [(7 * len(request_id) + i) % 500 + 1 for i in range(prompt_len)]
    request = Request(
        request_id,
        prompt,
        params,
        None,
        arrival_time=arrival,
        priority=priority,
        resumable=resumable,
        block_hasher=block_hasher(scheduler),
    )
    scheduler.add_request(request)
    return request


def block_hasher(scheduler):
    """What vLLM's engine core gives each request for prefix caching; None with it off."""
    cache = scheduler.cache_config
    if not cache.enable_prefix_caching:
        return None
    hash_fn = get_hash_fn_by_name(cache.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    return get_request_block_hasher(scheduler.block_size, hash_fn)


def fake_model_output(scheduler, out: SchedulerOutput) -> ModelRunnerOutput:
    """What a model would return for ``out``: token 3 for each request past its prefill.

    Build it right after ``schedule()``, while the scheduler still says which requests are in
    the middle of a chunked prefill.
    """
    ids = list(out.num_scheduled_tokens)
    sampled = [[] if scheduler.requests[r].is_prefill_chunk else [3] for r in ids]
    index = {r: i for i, r in enumerate(ids)}
    return ModelRunnerOutput(req_ids=ids, req_id_to_index=index, sampled_token_ids=sampled)


def step(scheduler) -> SchedulerOutput:
    """One synchronous engine step, as vLLM runs on the CPU: schedule, run, update."""
    out = scheduler.schedule()
    scheduler.update_from_output(out, fake_model_output(scheduler, out))
    return out


def newly_scheduled(out: SchedulerOutput) -> set[str]:
    return {r.req_id for r in out.scheduled_new_reqs}
