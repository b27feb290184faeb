"""``xformers``: memory-efficient attention over a block-diagonal, padded-keys mask.

Queries stay packed (``[1, T, Hq, D]``); each request's pages are gathered into its own slot of
``S_max`` key rows (``[1, B * S_max, Hkv, D]``), and
``BlockDiagonalCausalWithOffsetPaddedKeysMask`` tells the kernel each slot's real length and
applies bottom-right causality, so no query is padded. The gather is needed because xformers'
paged masks want the pool as one ``[1, pages * page_size, Hkv, D]`` tensor, which our page-major
cache (all layers of a page together) cannot give as a view; its paged operators also need
flash-attn's 256-token pages or triton split-K's equal query lengths.

GQA is expressed the xformers way: 5-D ``[1, M, Hkv, G, D]`` with K/V expanded (stride 0) over
the ``G`` query heads that share a KV head.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from baton_paged.attention.base import AttentionRequirements
from baton_paged.attention.gather import GatheringBackend, StepMemo
from baton_paged.attention.metadata import AttentionMetadata

XFORMERS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CUTLASS_MAX_CAPABILITY = (9, 0)
"""float32 runs only on xformers' cutlass operator, which stops at sm90 (xformers 0.0.35)."""


class XformersBackend(GatheringBackend):
    name = "xformers"

    def __init__(self) -> None:
        super().__init__()
        self._step_mask: StepMemo[Any] = StepMemo()
        """Every layer of a step shares its mask (built once, not per layer)."""

    @classmethod
    def unsupported_reason(cls, req: AttentionRequirements) -> str | None:
        if req.device.type != "cuda":
            return f"needs a CUDA device (xformers has no {req.device.type} operator)"
        if req.dtype not in XFORMERS_DTYPES:
            return f"supports float16, bfloat16 and float32 only, not {req.dtype}"
        problem = _import_problem()
        problem = problem or _dtype_problem(req.dtype, torch.cuda.get_device_capability(req.device))
        return problem or _operator_problem(req.device, req.dtype, req.head_dim)

    def attend(
        self,
        query: torch.Tensor,
        key_pages: torch.Tensor,
        value_pages: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        from xformers.ops import fmha

        keys, values = self._workspace.gather(key_pages, value_pages, meta.block_table)
        batch, span, num_kv_heads, head_dim = keys.shape
        tokens, num_heads, _ = query.shape
        group = num_heads // num_kv_heads
        mask = self._mask(fmha, meta, span, query.device)
        kv_shape = (1, batch * span, num_kv_heads, group, head_dim)
        out = fmha.memory_efficient_attention(
            query.reshape(1, tokens, num_kv_heads, group, head_dim),
            keys.reshape(1, batch * span, num_kv_heads, 1, head_dim).expand(kv_shape),
            values.reshape(1, batch * span, num_kv_heads, 1, head_dim).expand(kv_shape),
            attn_bias=mask,
            scale=scale,
        )
        return out.reshape(tokens, num_heads, head_dim)

    def _mask(self, fmha: Any, meta: AttentionMetadata, span: int, device: torch.device) -> Any:
        """The step's block-diagonal mask, built (and its lengths uploaded) once per step."""
        return self._step_mask.get(
            meta,
            lambda: fmha.attn_bias.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
                q_seqlen=list(meta.query_lens),
                kv_padding=span,
                kv_seqlen=list(meta.context_lens),
                device=device,
            ),
        )


def _dtype_problem(dtype: torch.dtype, capability: tuple[int, int]) -> str | None:
    """Whether some xformers operator takes ``dtype`` on a GPU of ``capability``: float32 only
    cutlass (up to sm90), bfloat16 only from sm80 (flash, cutlass)."""
    if dtype == torch.float32 and capability > CUTLASS_MAX_CAPABILITY:
        return f"has no float32 operator on compute capability {capability[0]}.{capability[1]}"
    if dtype == torch.bfloat16 and capability < (8, 0):
        return f"needs compute capability 8.0+ for bfloat16, not {capability[0]}.{capability[1]}"
    return None


@functools.cache
def _import_problem() -> str | None:
    """Import xformers' attention now: present but broken (built for another torch, or beside
    a flash-attn it rejects) is unavailable, not a crash at the first forward."""
    try:
        from xformers.ops import fmha  # noqa: F401
    except ModuleNotFoundError as error:
        if error.name == "xformers":
            return "needs the xformers package (pip install 'baton-paged[gpu]')"
        return f"xformers cannot be imported: {error}"
    except Exception as error:
        return f"xformers cannot be imported: {type(error).__name__}: {error}"
    return None


@functools.cache
def _operator_problem(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Run one tiny attention of the kind ``attend`` runs (GQA 5-D, the padded-keys mask): the
    package can import yet have no operator that runs here. Its compiled library is built for
    one PyTorch; on another it does not load, and then every operator, even those that wrap
    PyTorch's own kernels, refuses CUDA inputs (seen with xformers 0.0.35, built for torch 2.10,
    on torch 2.11)."""
    from xformers.ops import fmha

    def zeros(rows: int) -> torch.Tensor:
        return torch.zeros(1, rows, 1, 2, head_dim, dtype=dtype, device=device)

    mask = fmha.attn_bias.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
        q_seqlen=[1, 2], kv_padding=4, kv_seqlen=[3, 4], device=device
    )
    try:
        fmha.memory_efficient_attention(zeros(3), zeros(8), zeros(8), attn_bias=mask)
    except NotImplementedError as error:
        return f"xformers has no operator that runs here ({_common_reasons(str(error))})" + (
            _library_hint()
        )
    return None


def _common_reasons(message: str) -> str:
    """The reasons every operator gave in xformers' "No operator found" message (each operator's
    block is a "... is not supported because:" line, then its reasons indented), else all."""
    blocks: list[set[str]] = []
    for line in message.splitlines():
        if line.rstrip().endswith("is not supported because:"):
            blocks.append(set())
        elif blocks and line.startswith("    "):
            blocks[-1].add(line.strip())
    if not blocks:
        return message.splitlines()[0] if message else "no reason given"
    shared = set.intersection(*blocks) or set.union(*blocks)
    return "; ".join(sorted(shared))


def _library_hint() -> str:
    """Why its compiled library did not load, when that is the cause."""
    try:
        from xformers import _cpp_lib
    except ImportError:
        return ""
    failure = getattr(_cpp_lib, "_cpp_library_load_exception", None)
    if failure is None:
        return ""
    lines = [line.strip() for line in str(failure).splitlines() if line.strip()]
    return f": its compiled library did not load ({' '.join(lines[:2])})"
