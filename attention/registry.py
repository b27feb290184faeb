"""Choosing an attention backend by name or automatically, with imports kept lazy.

Backend modules are imported only when asked for, so a missing flash-attn or xformers never
breaks ``import baton_paged``. ``auto`` takes the first backend in the device's preference order
that can serve the requirements; naming a backend that cannot run is an error that says why,
never a silent substitution.
"""

from __future__ import annotations

import importlib
from dataclasses import replace

from baton_paged.attention.base import (
    AttentionBackend,
    AttentionRequirements,
    BackendUnavailableError,
)

AUTO = "auto"

BACKENDS = {
    "cpu_paged": "baton_paged.attention.cpu_paged_backend:CpuPagedBackend",
    "torch": "baton_paged.attention.torch_backend:TorchBackend",
    "padded": "baton_paged.attention.padded_backend:PaddedBackend",
    "flash_attn": "baton_paged.attention.flash_backend:FlashAttnBackend",
    "xformers": "baton_paged.attention.xformers_backend:XformersBackend",
    "triton": "baton_paged.attention.triton_backend:TritonBackend",
}

# The selection rule, measured (benchmarks/results/gpu-check-2, an H200, torch 2.11, bf16):
# - CUDA: our Triton kernel first. It reads the pages in place and CUDA graphs capture it: the
#   engine made 1.74x (B=32) and 2.44x (B=128) the tokens/s of flash_attn's packed form, which
#   must gather each layer's pages at our 16-token pages and so runs eagerly. Per kernel
#   (bench_attention, decode, 32/8 heads x 64) Triton is 1.8-2.5x the HBM-read bound at B=128
#   against 4.1-5.6x for packed flash (its gather), 4.4x vs 11x on a mixed prefill+decode step;
#   packed flash wins only one request with a long context (B=1, 2k-8k: 1.5-3.8x faster: Triton
#   has no split over the context). flash_attn's in-place form (256-token pages, flash-attn
#   package or a torch whose varlen_attn takes a block table) is capturable but unmeasured, so it
#   does not rank above a measured winner. xformers next: its wheels on the index (0.0.35) are
#   built for torch 2.10 and no operator runs on 2.11 (the backend says so). Past them the padded
#   batch ranks above per-request SDPA (2.2x on the H200, bench_gpu); padding costs
#   O(B * Qmax * Smax) and SDPA's float bias per layer grows large for one long prompt among
#   decodes.
# - CPU: the in-place paged kernel (benchmarks/bench_attention.py: 0.80x dense SDPA on
#   pre-gathered K/V at context 256, where the torch backend's gather + SDPA took 1.81x); without
#   a compiler the torch backend's per-request forms are next (attention/torch_backend.py).
AUTO_ORDER = {
    "cuda": ("triton", "flash_attn", "xformers", "padded", "torch"),
    "cpu": ("cpu_paged", "torch"),
}
FALLBACK_ORDER = ("torch",)


def register_backend(name: str, target: str) -> None:
    """Make the ``AttentionBackend`` at ``target`` (``"module:Class"``, imported when first
    used) selectable as ``name`` (plugins call this; see ``baton_paged.plugins.registry``).
    Registering the same target again changes nothing; a name in use for another is an error.
    ``auto`` never picks a plugin's backend: it must be named."""
    module_name, sep, class_name = target.partition(":")
    if not (name and name != AUTO and sep and module_name and class_name):
        raise ValueError(
            f"register_backend needs a name and a 'module:Class' target, got {target!r}"
        )
    if BACKENDS.get(name, target) != target:
        raise ValueError(f"attention backend name {name!r} is taken by {BACKENDS[name]}")
    BACKENDS[name] = target


def backend_class(name: str) -> type[AttentionBackend]:
    """The class registered as ``name``; ValueError naming the choices for an unknown name."""
    if name not in BACKENDS:
        choices = ", ".join([AUTO, *BACKENDS])
        raise ValueError(f"unknown attention backend {name!r}; choose one of: {choices}")
    module_name, class_name = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def unsupported_reasons(req: AttentionRequirements) -> dict[str, str | None]:
    """Every registered backend mapped to why it cannot serve ``req`` (None: it can)."""
    return {name: backend_class(name).unsupported_reason(req) for name in BACKENDS}


def available_backends(req: AttentionRequirements) -> list[str]:
    return [name for name, reason in unsupported_reasons(req).items() if reason is None]


def resolve_backend_name(name: str, req: AttentionRequirements) -> str:
    """The backend ``name`` stands for: itself if it can serve ``req``, or the auto choice."""
    if name != AUTO:
        reason = backend_class(name).unsupported_reason(req)
        if reason is not None:
            raise BackendUnavailableError(f"attention backend {name!r} cannot run here: {reason}")
        return name
    for candidate in AUTO_ORDER.get(req.device.type, FALLBACK_ORDER):
        if backend_class(candidate).unsupported_reason(req) is None:
            return candidate
    return FALLBACK_ORDER[0]


def suggested_page_size(name: str, req: AttentionRequirements) -> int:
    """The page size to build the cache with when the user did not choose one: that of the
    backend ``name`` resolves to once each candidate is offered its own preferred size (so
    ``flash_attn`` with an in-place kernel gets 256-token pages). ``req.page_size`` is ignored."""
    candidates = AUTO_ORDER.get(req.device.type, FALLBACK_ORDER) if name == AUTO else (name,)
    for candidate in candidates:
        cls = backend_class(candidate)
        page_size = cls.page_size_for(req)
        if cls.unsupported_reason(replace(req, page_size=page_size)) is None:
            return page_size
    return backend_class(FALLBACK_ORDER[0]).page_size_for(req)


def create_backend(name: str, req: AttentionRequirements) -> AttentionBackend:
    """A ready backend for ``req``: ``name`` is a registered backend or ``"auto"``."""
    return backend_class(resolve_backend_name(name, req)).create(req)
