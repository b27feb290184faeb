"""GGUF checkpoints at their own bit width: the native executor's linears read the file's blocks.

transformers loads a GGUF dequantized (``gguf_loading.py``); that float model is what the
bridge, the embedding and the norms run. With ``quantization="gguf"`` each linear the executor
builds is instead stored as the file stores it:

- Q4_0, Q4_1, Q4_K: int4 groups of 32 holding the file's own codes (``gguf_blocks.py``), exact;
- Q5_0, Q5_1, Q5_K, Q6_K, Q8_0: int8 codes with the file's scale and offset per 16 or 32 inputs
  (``gguf_int8_blocks.py``, ``int8_groups.py``), exact;
- any other quantized format (Q2_K, Q3_K, the IQ formats, ...): re-quantized to int8 groups of
  16 from the file's values, the error reported;
- float tensors (F32, F16, BF16): kept dense at the model's dtype.

A fused projection (Q/K/V, gate/up) whose parts the file stores differently takes the widest
part's form, exactly (int4 groups are int8 groups with ``code = q - 8``): Q4_K_M keeps some
layers' V in Q6_K, and those layers' QKV are int8 groups.

Which file tensor feeds which HF linear is gguf's own name map; Llama's Q/K rows are stored
permuted for llama.cpp's rotary layout and are put back as transformers puts them back. Every
weight read here is checked against the one transformers loaded from the same file, so a naming
or row-order mismatch is an error, never a silently different model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from baton_paged.model.gguf_blocks import INT4_TYPES, int4_groups
from baton_paged.model.gguf_int8_blocks import INT8_TYPES, int8_groups
from baton_paged.model.int8_groups import Int8GroupWeights
from baton_paged.model.quantized_linear import Int4Weights, QuantizedWeights, int4_shape_problem

logger = logging.getLogger(__name__)

PERMUTED_ARCHITECTURES = ("llama",)
"""GGUF architectures whose Q/K rows llama.cpp's converter permutes (transformers undoes it)."""
AGREEMENT = 1e-2
"""Largest relative difference between a weight read here and the one transformers loaded (the
model's dtype rounds them apart by ~0.4% at most; a wrong tensor or row order is ~100%)."""
FORMS = ("int4", "int8", "dense")
"""What a linear can become, narrowest first: a fused projection takes its widest part's."""


@dataclass(frozen=True)
class FileTensor:
    """One linear's weight as the file holds it."""

    name: str
    qtype: Any
    """``gguf.GGMLQuantizationType``."""
    values: torch.Tensor
    """[out, in] float32: the weights the file stands for, in the HF model's row order."""
    codes: Int4Weights | Int8GroupWeights | None
    """The file's own codes where its format is one read exactly."""

    @property
    def form(self) -> str:
        if isinstance(self.codes, Int4Weights):
            return "int4"
        return "dense" if self.qtype.name in ("F32", "F16", "BF16") else "int8"


@dataclass(frozen=True)
class Requantized:
    """A file tensor stored in another form than the file's, and what it cost."""

    name: str
    file_type: str
    form: str
    relative_error: float
    """||stored - file|| / ||file|| over the whole tensor."""


class GGUFQuantizer:
    """``quantizer(weight, sources)`` (``quantized_linear.Quantizer``) reading the GGUF file
    ``model`` was loaded from; ``summary()`` says what became of its tensors."""

    def __init__(self, path: Path, model: torch.nn.Module):
        from gguf import MODEL_ARCH_NAMES, GGUFReader, get_tensor_name_map

        reader = GGUFReader(path)
        self.path, self.config = path, model.config
        self.architecture = _string_field(reader, "general.architecture")
        self.tensors = {t.name: t for t in reader.tensors}
        arch = {name: arch for arch, name in MODEL_ARCH_NAMES.items()}.get(self.architecture)
        if arch is None:
            raise ValueError(f"{path}: gguf knows no architecture {self.architecture!r}")
        names = get_tensor_name_map(arch, self.config.num_hidden_layers)
        self.file_names = {id(m): names.get_name(n) for n, m in model.named_modules()}
        self.exact: dict[str, int] = {}
        """Linears kept at the file's own codes, by file format."""
        self.dense = 0
        self.requantized: list[Requantized] = []

    def __call__(
        self, weight: torch.Tensor, sources: tuple[torch.nn.Module, ...]
    ) -> QuantizedWeights | None:
        parts = [self._read(module) for module in sources]
        _check_agreement(parts, weight)
        form = max((p.form for p in parts), key=FORMS.index)
        if form == "int4" and int4_shape_problem(*weight.shape):
            form = "int8"
        if form == "dense":
            self.dense += len(parts)
            return None
        stored = [self._stored(part, form) for part in parts]
        kind = Int4Weights if form == "int4" else Int8GroupWeights
        return kind.stacked(stored)

    def summary(self) -> str:
        """One line: how many linears kept the file's codes, which were re-quantized and the
        worst relative error that cost."""
        kept = ", ".join(f"{count} {qtype}" for qtype, count in sorted(self.exact.items()))
        words = [f"{self.path.name} at its own width: the file's own codes ({kept or 'none'})"]
        if self.dense:
            words.append(f"{self.dense} dense (float in the file)")
        if self.requantized:
            worst = max(self.requantized, key=lambda r: r.relative_error)
            changes = sorted({f"{r.file_type}->{r.form}" for r in self.requantized})
            words.append(
                f"{len(self.requantized)} re-quantized ({', '.join(changes)}; worst relative "
                f"error {worst.relative_error:.2%}, {worst.name})"
            )
        return "; ".join(words)

    def _read(self, module: torch.nn.Module) -> FileTensor:
        name = self.file_names.get(id(module))
        if name is not None and f"{name}.weight" not in self.tensors and name == "output":
            name = "token_embd"  # a tied LM head is the embedding matrix
        tensor = self.tensors.get(f"{name}.weight")
        if tensor is None:
            raise ValueError(f"{self.path} holds no tensor for the linear {module}")
        qtype, raw = tensor.tensor_type, np.asarray(tensor.data)
        codes = None
        if qtype.name in INT4_TYPES:
            arrays = [torch.from_numpy(a) for a in int4_groups(raw, qtype.name)]
            codes = Int4Weights.from_codes(*(self._row_order(name, a) for a in arrays))
        elif qtype.name in INT8_TYPES:
            *arrays, group = int8_groups(raw, qtype.name)
            rows = (self._row_order(name, torch.from_numpy(a)) for a in arrays)
            codes = Int8GroupWeights.from_codes(*rows, group)
        if codes is not None:
            values = codes.dequantized(torch.float32)
        else:
            values = self._row_order(name, torch.from_numpy(_dequantized(raw, qtype)))
        return FileTensor(f"{name}.weight", qtype, values, codes)

    def _row_order(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` (one per output feature) in the HF model's order."""
        role = name.rsplit(".", 1)[-1]
        if self.architecture not in PERMUTED_ARCHITECTURES or role not in ("attn_q", "attn_k"):
            return rows
        config = self.config
        heads = config.num_attention_heads if role == "attn_q" else config.num_key_value_heads
        per_half = rows.shape[0] // heads // 2
        unpermuted = rows.reshape(heads, per_half, 2, *rows.shape[1:]).transpose(1, 2)
        return unpermuted.reshape(rows.shape).contiguous()

    def _stored(self, part: FileTensor, form: str) -> QuantizedWeights:
        """``part`` as ``form``: its own codes where it has them (int4 ones widen exactly into
        int8 groups), else re-quantized to int8 groups, the error recorded."""
        exact = part.codes
        if form == "int8" and isinstance(exact, Int4Weights):
            exact = Int8GroupWeights.from_int4(exact)
        if exact is not None:
            self.exact[part.qtype.name] = self.exact.get(part.qtype.name, 0) + 1
            return exact
        stored = Int8GroupWeights.quantize(part.values)
        error = (stored.dequantized(torch.float32) - part.values).norm() / part.values.norm()
        self.requantized.append(Requantized(part.name, part.qtype.name, form, float(error)))
        return stored


def _check_agreement(parts: list[FileTensor], weight: torch.Tensor) -> None:
    row = 0
    for part in parts:
        loaded = weight[row : row + part.values.shape[0]].float()
        row += part.values.shape[0]
        difference = float("inf")
        if loaded.shape == part.values.shape:
            difference = (loaded - part.values).norm() / part.values.norm().clamp(min=1e-30)
        if difference > AGREEMENT:
            raise ValueError(
                f"{part.name} read from the GGUF file differs from the weight transformers "
                f"loaded from it (relative difference {difference:.3g}): its layout is not the "
                "one this reader knows; run with quantization=None and dtype=float32"
            )


def _dequantized(raw: np.ndarray, qtype: Any) -> np.ndarray:
    from gguf import quants

    return np.array(
        quants.dequantize(raw, qtype), dtype=np.float32
    )  # a copy: the file is read-only


def _string_field(reader: Any, key: str) -> str:
    found = reader.fields.get(key)
    if found is None:
        raise ValueError(f"the GGUF file states no {key}")
    return str(found.contents())
