"""Fails when a vLLM upgrade changes what the plugin depends on, before it misbehaves silently.

``baton_paged.plugins.vllm_mirror`` repeats vLLM's admission arithmetic, and the plugin reads
and writes vLLM's scheduler state (some of it private). ``test_vllm_mirror`` catches a mirror
that disagrees with vLLM only on the cases it drives; these catch any change at the source:
each mirrored vLLM function's source is fingerprinted, and each attribute the plugin touches on
vLLM's scheduler, requests and blocks must still exist, as a method or as an attribute.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import io
import re
import textwrap
import tokenize
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from scheduler_steps import add, step  # noqa: E402
from vllm.v1.core.sched.async_scheduler import AsyncScheduler  # noqa: E402

from baton_paged.plugins import vllm_mirror, vllm_scheduler  # noqa: E402

MIRRORED = {
    "vllm.v1.core.sched.scheduler.Scheduler.schedule": "f8ca30103722ae7f",
    "vllm.v1.core.sched.scheduler.Scheduler._handle_blocked_waiting_request": "a693b20ced3b564f",
    "vllm.v1.core.sched.scheduler.Scheduler._get_local_prefix_cache_hit": "cc930b027935740e",
    "vllm.v1.core.sched.scheduler.Scheduler._preempt_request": "a66928f3b3fd12ab",
    "vllm.v1.core.kv_cache_manager.KVCacheManager.allocate_slots": "10b882d03f77cbf3",
    "vllm.v1.core.block_pool.BlockPool.free_blocks": "4099058b6545fa8a",
}
"""Each vLLM 0.32 function ``vllm_mirror`` mirrors, and the fingerprint of its source."""

SCHEDULER_SURFACE = {
    "_pause_state": "attribute",
    "_preempt_request": "method",
    "_request_blocks_can_be_freed": "method",
    "finished_recving_kv_req_ids": "attribute",
    "kv_cache_manager": "attribute",
    "kv_cache_manager.block_pool.get_num_free_blocks": "method",
    "kv_cache_manager.coordinator.get_num_blocks_to_allocate": "method",
    "kv_cache_manager.empty_kv_cache_blocks": "attribute",
    "kv_cache_manager.get_blocks": "method",
    "kv_cache_manager.get_computed_blocks": "method",
    "kv_cache_manager.usage": "attribute",
    "kv_cache_manager.watermark_blocks": "attribute",
    "kv_holding_waiting": "attribute",
    "max_model_len": "attribute",
    "max_num_active_reqs": "attribute",
    "max_num_scheduled_tokens": "attribute",
    "num_lookahead_tokens": "attribute",
    "num_waiting_for_streaming_input": "attribute",
    "policy": "attribute",
    "requests": "attribute",
    "requires_kv_delivery": "attribute",
    "running": "attribute",
    "schedule": "method",
    "scheduler_config.enable_chunked_prefill": "attribute",
    "scheduler_config.long_prefill_token_threshold": "attribute",
    "scheduler_reserve_full_isl": "attribute",
    "vllm_config.additional_config": "attribute",
    "waiting": "attribute",
}
"""What the plugin touches on vLLM's scheduler (dotted: further in), and how it uses it."""

REQUEST_SURFACE = (
    "arrival_time",
    "drop_stale_output",
    "is_prefill_chunk",
    "num_computed_tokens",
    "num_output_placeholders",
    "num_prompt_tokens",
    "num_stale_output_tokens",
    "num_tokens",
    "num_tokens_with_spec",
    "priority",
    "request_id",
    "status",
)
"""What the plugin reads of vLLM's requests, all as attributes (some are properties)."""

BLOCK_SURFACE = ("block_id", "is_null", "ref_cnt")
"""What the mirror reads of vLLM's KV cache blocks, to count the blocks a preemption frees."""

VLLM_NAME = re.compile(r"``(vllm(?:\.\w+)+)``")


def fingerprint(qualified_name: str) -> str:
    """A hash of the named function's source, blind to comments, blank lines and indentation."""
    source = textwrap.dedent(inspect.getsource(resolve(qualified_name)))
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    kept = (t.string for t in tokens if t.type not in (tokenize.COMMENT, tokenize.NL))
    return hashlib.sha256(" ".join(kept).encode()).hexdigest()[:16]


def resolve(qualified_name: str) -> object:
    """The object ``module.path.Class.function`` names, importing the longest module prefix."""
    parts = qualified_name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            found = getattr(found, name)
        return found
    raise ImportError(qualified_name)


def mirrors_of(qualified_name: str) -> list[str]:
    """The functions of ``vllm_mirror`` whose docstrings say they mirror ``qualified_name``."""
    return [n for n, doc in mirror_docstrings().items() if qualified_name in VLLM_NAME.findall(doc)]


def mirror_docstrings() -> dict[str, str]:
    """Every function and method of ``vllm_mirror`` with its docstring."""
    found = {}
    for name, obj in vars(vllm_mirror).items():
        if inspect.isclass(obj) and obj.__module__ == vllm_mirror.__name__:
            found |= {f"{name}.{m}": inspect.getdoc(f) or "" for m, f in vars(obj).items()}
        elif inspect.isfunction(obj) and obj.__module__ == vllm_mirror.__name__:
            found[name] = inspect.getdoc(obj) or ""
    return {name: doc for name, doc in found.items() if not name.split(".")[-1].startswith("__")}


@pytest.mark.parametrize("qualified_name", sorted(MIRRORED))
def test_the_vllm_functions_the_mirror_repeats_are_unchanged(qualified_name):
    assert fingerprint(qualified_name) == MIRRORED[qualified_name], (
        f"vLLM's {qualified_name} changed since the plugin mirrored it (vLLM 0.32). Re-check "
        f"{', '.join(mirrors_of(qualified_name))} in baton_paged.plugins.vllm_mirror against "
        f"the new code, then record its new fingerprint in MIRRORED."
    )


def test_every_mirror_function_names_what_it_mirrors_and_each_is_fingerprinted():
    docs = {name: doc for name, doc in mirror_docstrings().items() if "." not in name}
    unnamed = [name for name, doc in docs.items() if not VLLM_NAME.search(doc)]
    assert not unnamed, f"vllm_mirror functions naming no vLLM function: {unnamed}"
    named = {m for doc in mirror_docstrings().values() for m in VLLM_NAME.findall(doc)}
    assert named == set(MIRRORED)


def test_the_scheduler_state_the_plugin_touches_is_still_there(make_scheduler):
    scheduler = make_scheduler(usable_blocks=8, cls=AsyncScheduler)
    assert_surface("scheduler", scheduler, SCHEDULER_SURFACE)


def test_the_request_and_block_state_the_plugin_reads_is_still_there(make_scheduler):
    scheduler = make_scheduler(usable_blocks=8, cls=AsyncScheduler)
    request = add(scheduler, "r", 20)
    step(scheduler)
    block = scheduler.kv_cache_manager.get_blocks("r").blocks[0][0]
    assert_surface("request", request, dict.fromkeys(REQUEST_SURFACE, "attribute"))
    assert_surface("KV cache block", block, dict.fromkeys(BLOCK_SURFACE, "attribute"))


def assert_surface(what: str, obj: object, surface: dict[str, str]) -> None:
    """Each dotted path of ``surface`` leads from ``obj`` to a method or attribute as listed."""
    for path, kind in surface.items():
        *steps, name = path.split(".")
        owner = obj
        for step_name in steps:
            owner = getattr(owner, step_name)
        assert hasattr(owner, name), f"vLLM's {what} has no {path} any more"
        found = "method" if inspect.ismethod(getattr(owner, name)) else "attribute"
        assert found == kind, f"vLLM's {what}'s {path} is used as {kind} but is {found}"


def test_the_surface_lists_everything_the_plugin_touches():
    """A new use of vLLM's scheduler in the plugin must be listed above to be checked."""
    touched = touched_names(vllm_scheduler, "self") | touched_names(vllm_mirror, "scheduler")
    own = set(vars(vllm_scheduler.BatonScheduler))  # and its instance attributes, baton_*
    touched = {n for n in touched if n not in own and "baton_" not in n}
    listed = {path.split(".")[0] for path in SCHEDULER_SURFACE}
    # schedule: overridden, so only called through super()
    assert touched | {"schedule"} == listed, "list new uses in SCHEDULER_SURFACE, drop old ones"


def touched_names(module, receiver: str) -> set[str]:
    """The attributes read or written on the variable ``receiver`` anywhere in ``module``."""
    tree = ast.parse(Path(module.__file__).read_text())
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == receiver
    }
