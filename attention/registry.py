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

# On CUDA our Triton kernel reads the pages in place and is captured by CUDA graphs (it needs
# only the triton that CUDA torch ships); flash-attn and xformers follow it: on a stock PyTorch
# both gather each layer's pages (flash-attn's packed form at 16-token pages) and run eagerly,
# PROVISIONAL until the H200 run measures them (bench_gpu baton-triton/-flash/-xformers). Past them
# the padded batch ranks above per-request SDPA: measured on an H200 (bench_gpu, bf16, B=32 and
# 128) it ran 2.2x the torch backend, though padding costs O(B * Qmax * Smax) and SDPA's float
# bias per layer grows large for one long prompt among decodes. On CPU the in-place paged kernel
# wins (benchmarks/bench_attention.py: 0.80x dense SDPA on pre-gathered K/V at context 256, where
# the torch backend's gather + SDPA took 1.81x); without a compiler the torch backend's
# per-request forms are next (attention/torch_backend.py).
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
