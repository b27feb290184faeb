"""int4 and fp8 on CUDA (``cuda_quantized.py``): each module equals a matmul on its own rounded
operands, the engine on a quantized model follows HF on the same model, and every place the
kernels cannot run is refused. fp8's arithmetic is checked on the CPU too (torch's ``_scaled_mm``
has a CPU kernel); the rest needs a CUDA device (``gpu``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_gpu_bf16 import gaps_to_hf
from transformers import AutoModelForCausalLM

from baton_paged import LLM, SamplingParams
from baton_paged.config import EngineConfig
from baton_paged.engine import Engine
from baton_paged.model.cuda_quantized import (
    FP8_MAX,
    Fp8Linear,
    Fp8Weights,
    Int4CudaLinear,
    cuda_problem,
    fp8_rows,
    quantize_linears,
)
from baton_paged.model.quantized_linear import Int4Weights

on_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TIE = 0.05
"""A bf16 near-tie of the logits (``test_gpu_bf16.py``): within what two bf16 paths round apart."""


def fp8_reference(x, weights, bias):
    """The matmul fp8 computes: each activation row rounded to e4m3 at its own scale, times the
    dequantized weights, in float32."""
    rows, scale = fp8_rows(x.reshape(-1, x.shape[-1]))
    out = F.linear(rows.float() * scale, weights.dequantized(torch.float32), bias.float())
    return out.reshape(*x.shape[:-1], -1)


def test_fp8_weights_round_trip_within_e4m3s_precision():
    weight = torch.randn(48, 64) * torch.linspace(0.01, 3, 48)[:, None]
    weights = Fp8Weights.quantize(weight)
    assert weights.q.dtype == torch.float8_e4m3fn and weights.q.float().abs().max() <= FP8_MAX
    error = (weights.dequantized(torch.float32) - weight).abs()
    # e4m3 keeps 3 mantissa bits: half a step is 1/16 of a value (above its subnormals)
    normal = weight.abs() >= weights.scale[:, None] * 2**-6
    assert (error[normal] <= weight.abs()[normal] / 16 + 1e-7).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, on_cuda])])
def test_fp8_linear_equals_a_matmul_on_its_rounded_operands(device):
    torch.manual_seed(0)
    weight = (torch.randn(96, 160) * 0.1).to(device, torch.bfloat16)
    bias = torch.randn(96).to(device, torch.bfloat16)
    weights = Fp8Weights.quantize(weight)
    layer = Fp8Linear(weights, bias)
    for shape in [(1, 160), (7, 160), (2, 5, 160)]:
        x = torch.randn(*shape).to(device, torch.bfloat16)
        got = layer(x)
        assert got.dtype == torch.bfloat16 and got.shape == (*shape[:-1], 96)
        expected = fp8_reference(x, weights, bias)
        torch.testing.assert_close(got.float(), expected, atol=3e-2, rtol=1e-2)
    # and fp8 did round: the unquantized matmul differs by more than bfloat16's rounding
    plain = F.linear(x.float(), weight.float(), bias.float())
    assert (plain - expected).abs().max() > 3e-2


def test_cuda_methods_are_refused_where_they_cannot_run(tiny_model_dir):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert "int8 runs on the CPU only" in cuda_problem("int8", cuda, torch.bfloat16)
    assert "fp8 needs a CUDA device" in cuda_problem("fp8", cpu, torch.bfloat16)
    assert "bfloat16 activations" in cuda_problem("int4", cuda, torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.bfloat16)
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="quantization='fp8' on CUDA: fp8 needs a CUDA device"):
        quantize_linears(model, "fp8")
    assert {n: type(m) for n, m in model.named_modules()} == before
    with pytest.raises(ValueError, match="quantization='fp8' needs CUDA"):
        LLM(str(tiny_model_dir("llama")), dtype="bfloat16", quantization="fp8")


@pytest.mark.gpu
@on_cuda
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_int4_linear_on_cuda_equals_a_matmul_on_its_dequantized_weights(rows):
    torch.manual_seed(0)
    weight = (torch.randn(96, 256) * 0.1).cuda().to(torch.bfloat16)
    bias = torch.randn(96).cuda().to(torch.bfloat16)
    weights = Int4Weights.quantize(weight)
    layer = Int4CudaLinear(weights, bias)
    x = torch.randn(rows, 256).cuda().to(torch.bfloat16)
    expected = F.linear(x.float(), weights.dequantized(torch.bfloat16).float(), bias.float())
    got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 96)
    torch.testing.assert_close(got.float(), expected, atol=3e-2, rtol=1e-2)


def quantized_model(path, method: str):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    swapped = quantize_linears(model, method)
    assert swapped == 7 * model.config.num_hidden_layers  # q k v o gate up down; the head stays
    return model


@pytest.mark.gpu
@on_cuda
@pytest.mark.parametrize("method", ["int4", "fp8"])
def test_engine_on_a_quantized_model_follows_hf_on_the_same_model(tiny_model_dir, method):
    """The engine quantizes the checkpoint it loads; HF runs an identically quantized copy
    (quantization is deterministic). Every token the engine picks is HF's argmax or within a
    bfloat16 near-tie of it."""
    if cuda_problem(method, torch.device("cuda"), torch.bfloat16):
        pytest.skip(cuda_problem(method, torch.device("cuda"), torch.bfloat16))
    path = tiny_model_dir("llama")
    reference = quantized_model(path, method)
    config = EngineConfig(model=str(path), device="cuda", dtype="bfloat16", quantization=method,
                          page_size=16, kv_memory="64MiB")  # fmt: skip
    engine = Engine(config)
    assert not any(type(m) is torch.nn.Linear for m in engine.model.model.layers.modules())
    prompts = [[5, 17, 300, 2, 9, 44, 100], [7, 8, 9], list(range(30, 90))]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request({"prompt_token_ids": prompt}, params, request_id=str(i))
    done = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                done[int(output.request_id)] = list(output.outputs[0].token_ids)
    gaps = torch.cat([gaps_to_hf(reference, p, done[i]) for i, p in enumerate(prompts)])
    assert float(gaps.max()) <= TIE and float((gaps == 0).float().mean()) >= 0.9
