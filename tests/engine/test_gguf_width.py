"""GGUF checkpoints at their own bit width: the native executor reads the file's blocks, and what
it runs is the file's model (checked against transformers' dequantized load of the same file)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QuantType
from gguf import GGUFReader
from gguf_writer import write_llama_gguf
from test_llama_executor import TOLERANCE, prefill_logits
from test_quantization import greedy_pair
from transformers import AutoModelForCausalLM

from baton_paged import LLM, SamplingParams
from baton_paged.attention import attach
from baton_paged.config import EngineConfig
from baton_paged.model.decoder_kernels import DECODER_KERNELS
from baton_paged.model.gguf_blocks import int4_groups
from baton_paged.model.gguf_weights import FileTensor, GGUFQuantizer
from baton_paged.model.int8_groups import BlockedGroupInt8Linear, GroupInt8Linear, Int8GroupWeights
from baton_paged.model.llama_executor import LlamaExecutor
from baton_paged.model.loading import load_model, resolve_quantization
from baton_paged.model.packed_linear import PackedLinear
from baton_paged.model.quantized_linear import BlockedInt4Linear, Int4Linear, Quantization

PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
ALL_Q4 = {**dict.fromkeys(PROJECTIONS, QuantType.Q4_0), "output": QuantType.Q4_1}
MIXED = {
    "attn_q": QuantType.Q4_0,
    "attn_k": QuantType.Q4_0,
    "attn_v": QuantType.Q8_0,  # QKV takes its widest part's form: int8 groups
    "attn_output": QuantType.F16,  # float in the file: dense
    "ffn_gate": QuantType.Q4_1,
    "ffn_up": QuantType.Q4_1,  # gate-up: int4, the file's own codes
    "ffn_down": QuantType.Q5_0,  # int8 groups, the file's own codes
    "output": QuantType.Q8_0,
}
PROMPTS = [[5, 17, 300], [7, 8], list(range(30, 90))]
GROUP_KERNELS = (BlockedGroupInt8Linear, GroupInt8Linear)
"""What reads int8 groups: the column-block kernel, or without AVX-512 the matrix-vector one."""
INT4_KERNELS = (BlockedInt4Linear, Int4Linear)
"""What reads int4 groups: the column-block kernel, or without AVX-512 torch's."""


@pytest.fixture(scope="module")
def gguf_of(tiny_model_dir, tmp_path_factory):
    made = {}

    def write(name: str, formats: dict):
        if name not in made:
            out = tmp_path_factory.mktemp("gguf") / f"{name}.gguf"
            made[name] = write_llama_gguf(tiny_model_dir("llama"), out, formats=formats)
        return made[name]

    return write


def executor_on(path, dtype: torch.dtype):
    """``(executor, model, quantizer)``: the file loaded as the engine loads it, its linears
    read at the file's width."""
    model, _ = load_model(EngineConfig(model=str(path), dtype=str(dtype).split(".")[1]))
    quantizer = GGUFQuantizer(path, model)
    quantization = Quantization(head=quantizer, layers=quantizer)
    executor = LlamaExecutor(model, DECODER_KERNELS.kernels(), 128, quantization)
    return executor, model, quantizer


def file_codes(path, name: str) -> torch.Tensor:
    tensor = next(t for t in GGUFReader(path).tensors if t.name == name)
    codes, _, _ = int4_groups(np.asarray(tensor.data), tensor.tensor_type.name)
    return torch.from_numpy(codes)


def test_a_q4_file_runs_on_its_own_codes(gguf_of):
    """The int4 kernel holds the file's codes (Q/K rows put back in the HF order), and the
    weights the HF modules view are the file's values (with each group's scale and offset
    rounded to bfloat16, as the kernel reads them)."""
    path = gguf_of("q4", ALL_Q4)
    reference, _ = load_model(EngineConfig(model=str(path), dtype="float32"))
    model, _ = load_model(EngineConfig(model=str(path), dtype="bfloat16"))
    quantizer = GGUFQuantizer(path, model)
    attn = model.model.layers[1].self_attn
    down = model.model.layers[1].mlp.down_proj
    assert torch.equal(quantizer(down.weight, (down,)).q, file_codes(path, "blk.1.ffn_down.weight"))
    fused = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    stored = quantizer(fused, (attn.q_proj, attn.k_proj, attn.v_proj))
    assert stored.q.shape == fused.shape
    assert torch.equal(stored.q[128 - 32 :], file_codes(path, "blk.1.attn_v.weight"))
    assert not torch.equal(stored.q[:64], file_codes(path, "blk.1.attn_q.weight"))  # permuted
    quantizer = GGUFQuantizer(path, model)
    executor = LlamaExecutor(
        model, DECODER_KERNELS.kernels(), 128, Quantization(quantizer, quantizer)
    )
    assert isinstance(executor.layers[0].qkv.kernel, INT4_KERNELS)
    assert isinstance(executor.lm_head.kernel, INT4_KERNELS)  # Q4_1 in the file: int4 too
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        atol = theirs.abs().max().item() * 2**-7
        torch.testing.assert_close(ours.float(), theirs, rtol=0, atol=atol)
    assert "the file's own codes (14 Q4_0, 1 Q4_1)" in quantizer.summary()
    assert quantizer.requantized == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("formats", ["q4", "mixed"])
def test_executor_logits_equal_hf_on_the_weights_it_holds(gguf_of, dtype, formats):
    """Short prompts one at a time (bfloat16: the quantized kernels) and one long prompt
    (oneDNN on the dequantized weights), against HF's forward on the weights the executor wrote
    into the model: the quantized model, read plainly."""
    path = gguf_of(formats, ALL_Q4 if formats == "q4" else MIXED)
    executor, model, _ = executor_on(path, dtype)
    with torch.inference_mode():
        expected = torch.stack([model(torch.tensor([p])).logits[0, -1] for p in PROMPTS])
        attach(model, 128)
        got = torch.cat([prefill_logits(executor, model, [p], dtype) for p in PROMPTS])
    scale = expected.abs().max().item()
    assert (got.double() - expected.double()).abs().max().item() <= TOLERANCE[dtype] * scale


def test_mixed_formats_take_their_widest_parts_form_exactly(gguf_of):
    """Q/K in Q4_0 beside V in Q8_0 become int8 groups, the Q4_0 codes widened exactly; the
    5- and 8-bit formats keep the file's own codes and scales; F16 stays dense. Every stored
    weight is the file's value, as transformers' float32 load of it has it."""
    path = gguf_of("mixed", MIXED)
    reference, _ = load_model(EngineConfig(model=str(path), dtype="float32"))
    executor, model, quantizer = executor_on(path, torch.bfloat16)
    layer = executor.layers[0]
    assert isinstance(layer.qkv.kernel, GROUP_KERNELS)
    assert isinstance(layer.o, PackedLinear)
    assert isinstance(layer.gate_up.kernel, INT4_KERNELS)
    assert isinstance(layer.down.kernel, GROUP_KERNELS)
    assert isinstance(executor.lm_head.kernel, GROUP_KERNELS)
    attn = reference.model.layers[0].self_attn
    fused = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    torch.testing.assert_close(layer.qkv.kernel.weights.dequantized(torch.float32), fused,
                               rtol=1e-6, atol=1e-7)  # fmt: skip
    assert quantizer.requantized == []
    summary = quantizer.summary()
    assert "the file's own codes (4 Q4_0, 4 Q4_1, 2 Q5_0, 3 Q8_0); 2 dense" in summary


def test_a_format_read_from_values_is_re_quantized_to_int8_groups_with_its_error(gguf_of):
    """Formats with no exact reader here (Q2_K, Q3_K, the IQ ones) go through their values."""
    _, _, quantizer = executor_on(gguf_of("q4", ALL_Q4), torch.bfloat16)
    values = torch.randn(32, 256) * 0.02
    part = FileTensor("blk.0.attn_q.weight", QuantType.Q3_K, values, None)
    stored = quantizer._stored(part, part.form)
    assert isinstance(stored, Int8GroupWeights) and stored.group_size == 16
    (record,) = quantizer.requantized
    assert record.file_type == "Q3_K" and 0 < record.relative_error < 0.005
    assert "1 re-quantized (Q3_K->int8; worst relative error" in quantizer.summary()


def test_a_file_read_in_another_row_order_than_transformers_is_an_error(gguf_of, monkeypatch):
    """The check that every weight read from the file equals transformers' load of it: with
    Q/K's rotary permutation left in place, the model would be another one."""
    monkeypatch.setattr(GGUFQuantizer, "_row_order", lambda self, name, rows: rows)
    with pytest.raises(ValueError, match="blk.0.attn_q.weight read from the GGUF file differs"):
        executor_on(gguf_of("q4", ALL_Q4), torch.bfloat16)


def test_engine_on_a_q4_file_gives_hf_generate_greedy_tokens(gguf_of):
    """float32 reads the file's weights densely, as transformers' load of it does."""
    path = gguf_of("q4", ALL_Q4)
    reference, _ = load_model(EngineConfig(model=str(path), dtype="float32"))
    expected, got = greedy_pair(reference, str(path), dtype="float32", quantization="gguf")
    assert got == expected


def test_quantization_none_means_the_files_width_in_bfloat16_only(gguf_of, tiny_model_dir):
    path = str(gguf_of("q4", ALL_Q4))
    model, _ = load_model(EngineConfig(model=path, dtype="float32"))

    def resolved(**options):
        return resolve_quantization(EngineConfig(**options), model).quantization

    assert resolved(model=path, dtype="bfloat16") == "gguf"
    assert resolved(model=path, dtype="float32") is None  # float32 opts out (and runs faster)
    assert resolved(model=path, dtype="bfloat16", model_impl="transformers") is None
    assert resolved(model=path, dtype="bfloat16", quantization="int8") == "int8"
    directory = str(tiny_model_dir("llama"))
    assert resolved(model=directory, dtype="bfloat16") is None  # a float checkpoint stays float
    with pytest.raises(ValueError, match="quantization='gguf' reads a GGUF file's own blocks"):
        resolved(model=directory, dtype="bfloat16", quantization="gguf")


def test_chunked_prefill_runs_a_file_whose_head_is_int8_groups(gguf_of):
    """Chunks that end no prompt leave the LM head (Q8_0 here: int8 groups) no rows."""
    path = gguf_of("mixed", MIXED)
    with LLM(str(path), dtype="bfloat16", policy="chunked", max_num_batched_tokens=32,
             kv_memory="16MiB") as llm:  # fmt: skip
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        out = llm.generate([{"prompt_token_ids": list(range(10, 90))}], params, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 6


def test_the_engine_says_which_width_it_runs(gguf_of):
    with LLM(str(gguf_of("q4", ALL_Q4)), dtype="bfloat16", kv_memory="16MiB") as llm:
        assert llm.engine.config.quantization == "gguf"
        out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=4))
    assert len(out[0].outputs[0].token_ids) == 4


def test_hf_reference_load_is_transformers_own(gguf_of):
    """The reference the checks above lean on is transformers' own GGUF load, not ours."""
    path = gguf_of("q4", ALL_Q4)
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    ours, _ = load_model(EngineConfig(model=str(path), dtype="float32"))
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)
