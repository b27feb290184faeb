"""The native executor's small per-layer ops (RMSNorm, its fused residual add, rotary embedding,
SiLU-and-mul, in ``baton_paged/model/csrc/decoder_ops.cpp``), its int8-group linear without
AVX-512 (``group_int8.cpp``), its float32 and int8 linear on AVX-512 (``blocked_linear.cpp``),
its bfloat16 linear on AMX (``amx_linear.cpp``),
greedy sampling's argmax (``row_argmax.cpp``) and its layer loop (``decoder_loop.cpp``) as a
kernel library of their own, so attention's library holds only attention. They share
attention's vector helpers (``attention/csrc/cpu_common.h``, ``wide_math.h``) and its way of
sharing work items out among threads (``claimed_items.h``)."""

from __future__ import annotations

from pathlib import Path

from baton_paged.attention.cpu_extension import CSRC as ATTENTION_CSRC
from baton_paged.attention.cpu_extension import KernelLibrary

DECODER_KERNELS = KernelLibrary(
    name="baton_decoder_kernels",
    sources=tuple(
        Path(__file__).with_name("csrc") / f
        for f in (
            "decoder_ops.cpp",
            "group_int8.cpp",
            "blocked_linear.cpp",
            "amx_linear.cpp",
            "row_argmax.cpp",
            "decoder_loop.cpp",
        )
    ),
    headers=(
        ATTENTION_CSRC / "amx_tiles.h",
        ATTENTION_CSRC / "claimed_items.h",
        ATTENTION_CSRC / "cpu_common.h",
        ATTENTION_CSRC / "key_pairs.h",
        ATTENTION_CSRC / "wide_math.h",
        Path(__file__).with_name("csrc") / "decoder_ops.h",
    ),
    fallback="the model runs through the transformers bridge",
)
