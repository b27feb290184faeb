"""Weight-only int8 / int4: the formats round-trip within half a step, the kernels equal a plain
matmul on the dequantized weights, and a quantized engine equals HF run on those same weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_llama_executor import TOLERANCE, load, prefill_logits
from transformers import AutoModelForCausalLM, AutoTokenizer

from baton_paged import LLM, SamplingParams
from baton_paged.attention import attach
from baton_paged.config import EngineConfig
from baton_paged.model import llama_executor, quantize_math
from baton_paged.model import quantized_linear as quantized_linear_module
from baton_paged.model.decoder_kernels import DECODER_KERNELS
from baton_paged.model.int8_groups import Int8GroupWeights
from baton_paged.model.quantized_linear import (
    BLOCKED_ROWS,
    BlockedInt4Linear,
    BlockedInt8Linear,
    Int4Weights,
    Int8Weights,
    Quantization,
    quantize,
    quantized_linear,
)

PROJECTIONS = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}


def test_int8_rows_round_trip_within_half_a_step():
    weight = torch.randn(48, 96) * torch.linspace(0.01, 3, 48)[:, None]
    weight[5] = 0  # an all-zero row keeps a usable scale
    q = Int8Weights.quantize(weight)
    assert q.q.dtype == torch.int8 and q.q.abs().max() <= 127
    error = (q.dequantized(torch.float32) - weight).abs()
    assert (error <= q.scale[:, None] / 2 + 1e-7).all()
    assert (q.dequantized(torch.float32)[5] == 0).all()


def test_int4_groups_round_trip_within_half_a_step_with_their_extremes_exact():
    weight = torch.randn(48, 128) * 0.05 + torch.linspace(-1, 1, 48)[:, None]
    q = Int4Weights.quantize(weight)
    assert q.q.min() >= 0 and q.q.max() <= 15 and q.scale.shape == (48, 4)
    check_group_round_trip(q, weight)


def check_group_round_trip(q, weight) -> None:
    """Every weight within half its group's step, and each group's min and max exact."""
    rows, groups = q.scale.shape
    dense = q.dequantized(torch.float32).view(rows, groups, -1)
    weight = weight.view(rows, groups, -1)
    assert ((dense - weight).abs() <= q.scale[..., None] / 2 + 1e-6).all()
    torch.testing.assert_close(dense.amin(2), weight.amin(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(dense.amax(2), weight.amax(2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("fmt", [Int8Weights, Int4Weights, Int8GroupWeights])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizing_in_row_blocks_equals_quantizing_the_whole_weight(fmt, dtype, monkeypatch):
    """Blocks of 7 rows (the last one short) give the very bits one pass over the weight gives,
    quantized and dequantized."""
    weight = (torch.randn(48, 128) * torch.linspace(0.01, 2, 48)[:, None]).to(dtype)
    whole = fmt.quantize(weight)
    monkeypatch.setattr(quantize_math, "ROW_BLOCK_BYTES", 7 * 128 * 4)
    blocked = fmt.quantize(weight)
    for field in ("q", "scale", "zero"):
        if hasattr(whole, field):
            assert torch.equal(getattr(blocked, field), getattr(whole, field)), field
    dense = whole.dequantized(dtype)
    monkeypatch.setattr(quantize_math, "ROW_BLOCK_BYTES", 1 << 30)
    assert torch.equal(dense, whole.dequantized(dtype))


def test_int4_refuses_shapes_it_cannot_pack_before_touching_the_weight():
    with pytest.raises(ValueError, match="in_features \\(48\\) divisible by 32"):
        Int4Weights.quantize(torch.randn(16, 48))
    weight = torch.randn(40, 64, dtype=torch.bfloat16)
    before = weight.clone()
    with pytest.raises(ValueError, match="out_features \\(40\\) divisible by 16"):
        quantized_linear(weight, None, quantize(weight, "int4"))
    assert torch.equal(weight, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_both_ways_of_reading_a_quantized_linear_equal_a_matmul_on_its_dequantized_weights(
    method, dtype, rows
):
    """The quantized kernel and the dense linear on the dequantized weight, each called directly
    where the layer has it; and the weight handed in now holds the dequantized values."""
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 160, dtype=dtype) * 0.1, torch.randn(96, dtype=dtype)
    x = torch.randn(rows, 160, dtype=dtype)
    dense = quantize(weight, method).dequantized(dtype)
    expected = F.linear(x.float(), dense.float(), bias.float())
    layer = quantized_linear(weight, bias, quantize(weight, method))
    assert torch.equal(weight, dense)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    reads = [read for read in (layer.kernel, layer.dense, layer) if read is not None]
    for read in reads:
        got = read(x)
        assert got.dtype == dtype and got.shape == (rows, 96)
        torch.testing.assert_close(got.float(), expected, atol=tolerance, rtol=tolerance)


BLOCKED = hasattr(DECODER_KERNELS.kernels(), "blocked_linear")
"""Whether int8 codes are read in column blocks (the decoder library built for AVX-512)."""


@pytest.fixture
def torch_kernels(monkeypatch):
    """Quantized layers on torch's kernels, as without AVX-512 (no column blocks)."""
    monkeypatch.setattr(quantized_linear_module, "column_block_kernel", lambda weight: None)


@pytest.mark.parametrize(
    ("method", "dtype", "kernel_rows", "blocked"),
    [
        ("int8", torch.bfloat16, 4, False),
        ("int4", torch.bfloat16, 8, False),
        ("int4", torch.float32, 0, False),
        ("int8", torch.bfloat16, BLOCKED_ROWS["int8"], True),
        ("int4", torch.bfloat16, BLOCKED_ROWS["int4"], True),
    ],
)
def test_the_kernel_takes_a_few_rows_of_bfloat16_and_the_dense_copy_the_rest(
    method, dtype, kernel_rows, blocked, request
):
    """Column blocks (AVX-512) or torch's kernels; float32 never takes torch's (far slower than
    the dense matmuls there)."""
    if not blocked:
        request.getfixturevalue("torch_kernels")
    elif not BLOCKED:
        pytest.skip("the decoder library is not built for AVX-512")
    weight = torch.randn(64, 64, dtype=dtype)
    layer = quantized_linear(weight, None, quantize(weight, method))
    assert layer.kernel_rows == kernel_rows
    assert (layer.kernel is None) == (dtype == torch.float32)
    calls = []
    layer.kernel = lambda x: calls.append("kernel") or x
    layer.dense = lambda x: calls.append("dense") or x
    for rows in (1, kernel_rows, kernel_rows + 1):
        layer(torch.zeros(max(rows, 1), 64, dtype=dtype))
    expected = ["kernel", "kernel", "dense"] if kernel_rows else ["dense", "dense", "dense"]
    assert calls == expected


def test_a_dense_only_layer_takes_an_empty_batch(torch_kernels):
    """int4 under float32 on torch's kernels has no quantized kernel; a chunked step that ends no
    prompt hands the LM head no rows."""
    weight = torch.randn(64, 64)
    layer = quantized_linear(weight, None, quantize(weight, "int4"))
    assert layer.kernel is None
    assert layer(torch.zeros(0, 64)).shape == (0, 64)


@pytest.mark.skipif(not BLOCKED, reason="the decoder library is not built for AVX-512")
@pytest.mark.parametrize(
    ("method", "kind"), [("int8", BlockedInt8Linear), ("int4", BlockedInt4Linear)]
)
def test_float32_reads_only_the_codes_at_every_row_count(method, kind):
    """No dense copy packed beside the codes, so the layer lets the float weight go."""
    weight, bias = torch.randn(96, 64), torch.randn(96)
    layer = quantized_linear(weight, bias, quantize(weight, method))
    assert isinstance(layer.kernel, kind) and layer.dense is None
    assert layer.kernel.codes.element_size() == 1 and layer.release_weight()
    for rows in (0, 1, 49, 300):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(layer(x), F.linear(x, weight, bias), atol=1e-4, rtol=1e-4)


def dequantized_copy(model, method: str):
    """``model`` with every projection's weight replaced by its ``method``-quantized form,
    dequantized (and the LM head's by int8's): the model a quantized executor holds, as plain
    weights HF's own forward runs."""
    reference = copy.deepcopy(model)
    dtype = model.dtype

    def replace(linear: torch.nn.Linear, how: str) -> None:
        with torch.no_grad():  # in place, as the executor writes it: a tied embedding follows
            linear.weight.copy_(quantize(linear.weight, how).dequantized(dtype))

    for layer in reference.model.layers:
        for part, names in PROJECTIONS.items():
            for name in names:
                replace(getattr(getattr(layer, part), name), method)
    replace(reference.lm_head, "int8")
    return reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantized_executor_logits_equal_hf_on_the_dequantized_weights(
    tiny_model_dir, arch, method, dtype
):
    """Short prompts one at a time (bfloat16: a few rows, the quantized kernels) and one long
    prompt (oneDNN on the dequantized weights)."""
    model = load(tiny_model_dir, arch, dtype)
    reference = dequantized_copy(model, method)
    prompts = [[5, 17, 300], [7, 8], list(range(30, 90))]
    with torch.inference_mode():
        expected = torch.stack([reference(torch.tensor([p])).logits[0, -1] for p in prompts])
        plain = torch.stack([model(torch.tensor([p])).logits[0, -1] for p in prompts])
        executor = llama_executor.LlamaExecutor(
            model, DECODER_KERNELS.kernels(), 128, Quantization.by_method(method)
        )
        attach(model, 128)
        got = torch.cat([prefill_logits(executor, model, [p], dtype) for p in prompts])
    scale = expected.abs().max().item()
    assert (got.double() - expected.double()).abs().max().item() <= TOLERANCE[dtype] * scale
    # and the quantization did something: the unquantized model's logits differ
    moved = (plain.double() - expected.double()).abs().max().item()
    assert moved > TOLERANCE[torch.float32] * scale


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_engine_greedy_tokens_equal_hf_generate_on_the_dequantized_weights(
    tiny_model_dir, method
):
    path = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    reference = dequantized_copy(model, method)
    # float32: int8 codes in column blocks, scaled after the sum; int4 densely (PackedLinear)
    expected, got = greedy_pair(reference, str(path), dtype="float32", quantization=method)
    assert got == expected


def greedy_pair(reference, model: str, **options) -> tuple[list, list]:
    """24 greedy tokens for three prompts: HF ``generate``'s on ``reference``, and the native
    executor's engine's on ``model`` with ``options``."""
    prompts = [[5, 17, 300, 2, 9, 44, 100], [7, 8, 9], list(range(30, 60))]
    expected = []
    for prompt in prompts:
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
        expected.append(out[0, len(prompt) :].tolist())
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with LLM(model, kv_memory="16MiB", **options) as llm:
        assert llm.engine.snapshot.model_impl == "native"
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return expected, [list(o.outputs[0].token_ids) for o in outs]


def test_an_unknown_quantization_is_refused_before_any_model_loads():
    with pytest.raises(
        ValueError, match="unknown quantization 'awq'; choose one of: int8, int4, gguf, fp8"
    ):
        EngineConfig(quantization="awq")


def test_quantization_refuses_a_lent_model_whose_weights_it_would_rewrite(tiny_model_dir):
    path = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    before = model.model.layers[0].mlp.down_proj.weight.clone()
    with pytest.raises(ValueError, match="an already-loaded model is served as it is"):
        LLM(hf_model=model, tokenizer=AutoTokenizer.from_pretrained(path), quantization="int8")
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, before)


def test_quantization_refuses_the_bridge_rather_than_ignoring_itself(tiny_model_dir):
    with pytest.raises(ValueError, match="quantization runs in the native executor"):
        LLM(str(tiny_model_dir("llama")), quantization="int8", model_impl="transformers")
    with pytest.raises(ValueError, match="quantization needs the native executor.*GPT2"):
        LLM(str(tiny_model_dir("gpt2")), quantization="int8")
