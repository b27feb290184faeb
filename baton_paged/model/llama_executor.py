"""LlamaExecutor: the Llama family's forward written for the paged cache, with fused weights.

Running a Hugging Face model through the attention bridge costs ~25% of a CPU decode step in
small ops around the matmuls (a profile of B=32 on the small model: views, transposes, RoPE's
``cat``/``neg``, RMSNorm's float32 round trip, ``silu`` then ``mul``, three separate Q/K/V and two
gate/up matmuls). For the architectures that share Llama's decoder (Llama, SmolLM2, Mistral,
Qwen2 with its Q/K/V bias) this executor runs the same math in fewer, larger steps: one QKV
matmul and one gate-up matmul per layer (the HF modules' weights become views of the fused
tensors, so memory is not doubled and a lent model still works on its own after the engine
closes; a model the engine loaded itself gives up those dense weights once their packed copies
exist, ``owns_weights``, so it is held once), RoPE from a cos/sin table indexed by positions,
and RMSNorm fused with the residual add, each one call into the decoder's kernel library
(``decoder_kernels.py``, compiled from ``csrc/decoder_ops.cpp``). Every step follows Hugging
Face's op order and dtypes (RMSNorm in float32, the cos/sin table built exactly as HF builds
it), so its greedy tokens equal HF ``generate``'s.

Any other model, or one of these with features the executor does not implement (a rope type
that changes with the sequence length, an activation other than SiLU, sliding windows), runs
through the bridge; ``unsupported_reason`` says why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from baton_paged.attention import PagedStep
from baton_paged.attention.cpu_paged_backend import CpuPagedBackend
from baton_paged.model import packed_linear
from baton_paged.model.packed_linear import ColumnBlockCodes, PackedLinear
from baton_paged.model.quantized_linear import (
    Quantization,
    QuantizedLinear,
    Quantizer,
    quantized_linear,
)
from baton_paged.model.row_buckets import LARGEST, ROW_BUCKETS

Linear = Callable[[torch.Tensor], torch.Tensor]
"""A projection ``x -> x @ W.T + b``: a ``PackedLinear``, or an int8 / int4 one."""
LinearMaker = Callable[[torch.Tensor, torch.Tensor | None, tuple[torch.nn.Module, ...]], Linear]
"""``maker(weight, bias, sources)``: the linear for ``weight``, fused from the HF linears
``sources``."""

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
"""Rope types whose frequencies do not depend on the sequence length, so one table serves."""


def unsupported_reason(model: torch.nn.Module, device: torch.device) -> str | None:
    """Why the executor cannot run ``model`` on ``device``, or None."""
    name = type(model).__name__
    config = model.config
    if name not in ARCHITECTURES:
        return f"{name} is not one of the Llama-family architectures ({', '.join(ARCHITECTURES)})"
    if device.type != "cpu":
        return "the fused kernels are CPU kernels"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {config.hidden_act!r}, not silu"
    rope_type = getattr(model.model.rotary_emb, "rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        return f"rope type {rope_type!r} changes with the sequence length"
    if getattr(config, "mlp_bias", False) or getattr(config, "pretraining_tp", 1) > 1:
        return "MLP biases or tensor-parallel pretraining slices"
    return None


@dataclass(frozen=True)
class Layer:
    """One decoder layer's fused projections (their dense weights are views the HF modules share)
    and norms."""

    qkv: Linear
    o: Linear
    gate_up: Linear
    down: Linear
    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor

    def linears(self) -> tuple[Linear, ...]:
        return self.qkv, self.o, self.gate_up, self.down


class LlamaExecutor:
    """``forward(input_ids, positions, keep, step)`` -> logits of the ``keep`` rows.

    ``quantization`` (``quantized_linear.Quantization``): how the LM head's and the layers'
    weights are stored as the executor is built (int8 / int4 from their values, or a GGUF file's
    own blocks); the fused weights the HF modules view are overwritten with the dequantized
    values, so the model is the quantized one however it is read."""

    def __init__(
        self,
        model: torch.nn.Module,
        kernels: ModuleType,
        max_positions: int,
        quantization: Quantization | None = None,
        owns_weights: bool = False,
    ):
        config = model.config
        self.kernels = kernels
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scale = model.model.layers[0].self_attn.scaling
        self.eps = model.model.norm.variance_epsilon
        self.embed = model.model.embed_tokens.weight
        self.final_norm = model.model.norm.weight
        self.released = 0
        """Bytes of the HF modules' dense weights let go (``owns_weights``)."""
        release = self._release if owns_weights else None
        head = _linear_maker(quantization and quantization.head, release)
        self.lm_head = head(model.lm_head.weight, None, (model.lm_head,))
        linear = _linear_maker(quantization and quantization.layers, release)
        self.layers = [_fuse(layer, linear) for layer in model.model.layers]
        self.cos, self.sin = _rope_table(model, max_positions)
        self._loop = _loop_weights(self.layers) if hasattr(kernels, "decoder_layers") else None
        """The layers' weights for the C++ layer loop; None keeps the Python loop."""

    def warm_up(self, head_rows: int) -> int:
        """Have oneDNN build its kernels for every row bucket now (``row_buckets.py``), not in
        the first requests' forwards: the layers' at every bucket, the LM head's up to
        ``head_rows`` (the most rows a step samples). Returns the kernels built (none for
        float32 column-block linears, which compile nothing per row count)."""
        layers = [linear for layer in self.layers for linear in layer.linears()]
        built = packed_linear.warm_up(_dense(layers), LARGEST)
        return built + packed_linear.warm_up(_dense([self.lm_head]), head_rows)

    @torch.no_grad()
    def _release(self, linear: Linear, sources: tuple[torch.nn.Module, ...]) -> None:
        """Free the dense weight the HF modules ``sources`` hold once ``linear`` reads only its
        own (packed, or quantized) copy, as each linear is built: the freed memory holds
        the next layer's copies, so the model is not held twice. For models the engine loaded
        itself (``owns_weights``), which nothing else runs; the modules then hold meta tensors,
        so running the HF model fails loudly rather than computing garbage. A lent model keeps
        its weights; the embedding (and an LM head tied to it) stays."""
        if any(m.weight is self.embed for m in sources) or not linear.release_weight():
            return
        for module in sources:
            self.released += module.weight.numel() * module.weight.element_size()
            meta = torch.empty_like(module.weight, device="meta")
            module.weight = torch.nn.Parameter(meta, requires_grad=False)

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor, step: PagedStep
    ) -> torch.Tensor:
        residual = F.embedding(input_ids, self.embed)
        if self._loop is not None and isinstance(step.backend, CpuPagedBackend):
            hidden = self._layers_in_cpp(residual, positions, step)
        else:
            hidden = self._layers(residual, positions, step)
        kept = (residual.index_select(0, keep), hidden.index_select(0, keep))
        self.kernels.add_rms_norm(kept[1], kept[0], self.final_norm, self.eps)
        return self.lm_head(kept[1])

    def _layers(
        self, residual: torch.Tensor, positions: torch.Tensor, step: PagedStep
    ) -> torch.Tensor:
        """The decoder layers in Python: any linear (quantized ones too), any attention backend.
        ``residual`` is updated in place; returns the last layer's output."""
        k = self.kernels
        hidden = torch.empty_like(residual)
        k.rms_norm(hidden, residual, self.layers[0].input_norm, self.eps)
        for index, layer in enumerate(self.layers):
            if index:
                k.add_rms_norm(hidden, residual, layer.input_norm, self.eps)
            hidden = self._attention(hidden, positions, layer, index, step)
            k.add_rms_norm(hidden, residual, layer.post_attention_norm, self.eps)
            gate_up = layer.gate_up(hidden)
            activated = gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))
            k.silu_and_mul(activated, gate_up)
            hidden = layer.down(activated)
        return hidden

    def _layers_in_cpp(
        self, residual: torch.Tensor, positions: torch.Tensor, step: PagedStep
    ) -> torch.Tensor:
        """``_layers`` as one call into ``csrc/decoder_loop.cpp`` (the same kernels in the same
        order, so the same bits), for packed linears (int8 codes in column blocks too) on
        ``cpu_paged`` attention."""
        w, meta, cache = self._loop, step.metadata, step.cache
        write_kv, paged_attention = step.backend.kernel_addresses
        return self.kernels.decoder_layers(
            residual, w.norms, w.weights, w.codes, w.scales, w.zeros, w.biases, w.code_rows,
            ROW_BUCKETS,
            positions, self.cos, self.sin, cache.layer_keys, cache.layer_values,
            meta.slot_mapping, meta.block_table, meta.cu_seqlens_q, meta.seqused_k,
            self.num_heads, self.scale, self.eps, write_kv, paged_attention,
        )  # fmt: skip

    def _attention(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        layer: Layer,
        index: int,
        step: PagedStep,
    ) -> torch.Tensor:
        tokens = hidden.shape[0]
        qkv = layer.qkv(hidden)
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        query = qkv[:, :q_width].view(tokens, self.num_heads, self.head_dim)
        key = qkv[:, q_width : q_width + kv_width].view(tokens, self.num_kv_heads, self.head_dim)
        value = qkv[:, q_width + kv_width :].view(tokens, self.num_kv_heads, self.head_dim)
        self.kernels.rotary_embedding(query, key, positions, self.cos, self.sin)
        out = step.backend.forward(query, key, value, step.cache, index, step.metadata, self.scale)
        return layer.o(out.view(tokens, q_width))


@dataclass(frozen=True)
class LoopWeights:
    """The layers as ``decoder_layers`` reads them: two norms a layer, and per linear what it
    reads (float32 column blocks, bfloat16 pair blocks, oneDNN's packing, or codes alone), its
    codes where it reads them for up to ``code_rows`` rows beside a dense copy (0: none), the
    scale (and for groups the offset) of its codes, its bias."""

    norms: list[torch.Tensor]
    weights: list[torch.Tensor]
    codes: list[torch.Tensor | None]
    scales: list[torch.Tensor | None]
    zeros: list[torch.Tensor | None]
    biases: list[torch.Tensor | None]
    code_rows: list[int]


def _loop_weights(layers: list[Layer]) -> LoopWeights | None:
    """The layers' weights for the C++ loop, or None where a linear is read otherwise."""
    norms = [norm for layer in layers for norm in (layer.input_norm, layer.post_attention_norm)]
    linears = [linear for layer in layers for linear in layer.linears()]
    parts = [_loop_parts(linear) for linear in linears]
    if None in parts:
        return None
    pairs = zip(linears, parts, strict=True)
    code_rows = [linear.kernel_rows if part[1] is not None else 0 for linear, part in pairs]
    columns = (list(column) for column in zip(*parts, strict=True))
    return LoopWeights(norms, *columns, code_rows=code_rows)


def _loop_parts(linear: Linear) -> tuple | None:
    """``(weight, codes, scale, zero, bias)`` of ``linear`` as ``LoopWeights`` lists them, or
    None where the C++ loop cannot read it (unpacked, or quantized other than int8 codes in
    column blocks)."""
    if isinstance(linear, PackedLinear):
        return (linear.packed_weight, None, None, None, linear.bias) if linear.packed else None
    if isinstance(linear, QuantizedLinear) and linear.kernel is None:
        return _loop_parts(linear.dense)  # read densely (int4 under float32)
    if not isinstance(linear, QuantizedLinear) or not isinstance(linear.kernel, ColumnBlockCodes):
        return None
    kernel, dense = linear.kernel, linear.dense
    if dense is None:
        return kernel.codes, None, kernel.scale, kernel.zero, kernel.bias
    if not dense.packed:
        return None
    return dense.packed_weight, kernel.codes, kernel.scale, kernel.zero, kernel.bias


def _dense(linears: Iterable[Linear]) -> list[PackedLinear]:
    """The packed linears that read ``linears``' weights densely (quantized ones' too, where
    they keep a dense copy)."""
    dense = (lin.dense if isinstance(lin, QuantizedLinear) else lin for lin in linears)
    return [linear for linear in dense if linear is not None]


def _linear_maker(quantizer: Quantizer | None, release: Callable | None) -> LinearMaker:
    """Linears stored as ``quantizer`` says; packed at the model's dtype where it keeps
    a weight dense (or there is none). ``release(linear, sources)`` follows each build."""

    def make(weight: torch.Tensor, bias: torch.Tensor | None, sources: tuple) -> Linear:
        weights = quantizer(weight, sources) if quantizer is not None else None
        if weights is None:
            linear = PackedLinear(weight, bias)
        else:
            linear = quantized_linear(weight, bias, weights)
        if release is not None:
            release(linear, sources)
        return linear

    return make


def _fuse(layer: torch.nn.Module, linear: LinearMaker) -> Layer:
    attn, mlp = layer.self_attn, layer.mlp
    qkv_sources = (attn.q_proj, attn.k_proj, attn.v_proj)
    qkv = _concat_into(*qkv_sources)
    gate_up_sources = (mlp.gate_proj, mlp.up_proj)
    biases = [m.bias for m in qkv_sources]
    qkv_bias = None
    if any(b is not None for b in biases):
        qkv_bias = torch.cat(
            [
                b if b is not None else m.weight.new_zeros(m.weight.shape[0])
                for b, m in zip(biases, qkv_sources, strict=True)
            ]
        )
    return Layer(
        qkv=linear(qkv, qkv_bias, qkv_sources),
        o=linear(attn.o_proj.weight, attn.o_proj.bias, (attn.o_proj,)),
        gate_up=linear(_concat_into(*gate_up_sources), None, gate_up_sources),
        down=linear(mlp.down_proj.weight, None, (mlp.down_proj,)),
        input_norm=layer.input_layernorm.weight,
        post_attention_norm=layer.post_attention_layernorm.weight,
    )


def _concat_into(*linears: torch.nn.Linear) -> torch.Tensor:
    """One weight for several linears on the same input; each linear's weight becomes a view of
    it, so the fused copy is the only copy."""
    fused = torch.cat([m.weight.detach() for m in linears])
    row = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight.data = fused[row : row + rows]
        row += rows
    return fused


def _rope_table(model: torch.nn.Module, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[max_positions, head_dim]`` computed as HF's rotary module computes them per
    call (float32 frequencies, scaled, cast to the model dtype), so indexing equals calling."""
    rotary = model.model.rotary_emb
    positions = torch.arange(max_positions, dtype=torch.float32, device=rotary.inv_freq.device)
    freqs = positions[:, None] * rotary.inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    dtype = model.model.embed_tokens.weight.dtype
    cos = (emb.cos() * rotary.attention_scaling).to(dtype).contiguous()
    sin = (emb.sin() * rotary.attention_scaling).to(dtype).contiguous()
    return cos, sin
