"""The C++ layer loop (``csrc/decoder_loop.cpp``) gives the Python loop's logits to the bit, and
the executor takes it only where it can run: packed linears (float32 column blocks, oneDNN's, or
int8 codes in column blocks) on ``cpu_paged`` attention."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_llama_executor import load, prefill_logits
from test_row_buckets import mixed_batch_tokens

from baton_paged.attention import attach
from baton_paged.model import llama_executor, quantized_linear
from baton_paged.model.decoder_kernels import DECODER_KERNELS
from baton_paged.model.int8_groups import Int8GroupWeights
from baton_paged.model.quantized_linear import Int4Weights, Quantization

PROMPTS = [[5, 17, 300, 2, 9, 44, 100], [7, 8], list(range(30, 90))]


def both_loops(executor, model, dtype, calls: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The same prefill through the C++ loop, then the Python one (``calls`` records which)."""
    for name in ("_layers", "_layers_in_cpp"):
        method = getattr(executor, name)
        setattr(executor, name, lambda *a, m=method, n=name: calls.append(n) or m(*a))
    in_cpp = prefill_logits(executor, model, PROMPTS, dtype)
    executor._loop = None
    return in_cpp, prefill_logits(executor, model, PROMPTS, dtype)


@pytest.mark.parametrize(
    "dtype, packing",
    [(torch.float32, "auto"), (torch.float32, "onednn"), (torch.bfloat16, "auto")],
    ids=["float32", "float32-onednn", "bfloat16"],
)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_cpp_loop_gives_the_python_loops_logits_to_the_bit(
    tiny_model_dir, arch, dtype, packing, request
):
    """Qwen2 brings the QKV biases. float32 runs the column-block kernel where the CPU has
    AVX-512, and oneDNN's (``onednn``) as elsewhere; on oneDNN 60 + 7 + 2 tokens are padded to a
    bucket in both loops."""
    if packing == "onednn":
        request.getfixturevalue("onednn")
    model = load(tiny_model_dir, arch, dtype)
    calls = []
    with torch.inference_mode():
        executor = llama_executor.LlamaExecutor(model, DECODER_KERNELS.kernels(), 128)
        attach(model, 128)
        in_cpp, in_python = both_loops(executor, model, dtype, calls)
    assert calls == ["_layers_in_cpp", "_layers"]
    assert torch.equal(in_cpp, in_python)


@pytest.mark.parametrize("intermediate", [96, 48], ids=["gate-up-at-a-block", "gate-up-in-one"])
def test_bfloat16_gate_up_whose_halves_share_a_block_runs_as_two_calls(intermediate):
    """On AMX a gate-up projection runs with its activation in one pass when gate and up split at a
    block of 32 columns (96: three blocks each); 48 + 48 share the middle block, so the loop
    makes the two calls. Both give the Python loop's logits to the bit."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, intermediate_size=intermediate,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    calls = []
    with torch.inference_mode():
        executor = llama_executor.LlamaExecutor(model, DECODER_KERNELS.kernels(), 128)
        attach(model, 128)
        in_cpp, in_python = both_loops(executor, model, torch.bfloat16, calls)
    assert calls == ["_layers_in_cpp", "_layers"]
    assert torch.equal(in_cpp, in_python)


BLOCKED = hasattr(DECODER_KERNELS.kernels(), "blocked_linear")


def int8_groups(weight: torch.Tensor, sources) -> Int8GroupWeights:
    return Int8GroupWeights.quantize(weight)


def mixed_formats():
    """A quantizer giving int4 and int8 groups by turns: codes read up to different row counts in
    one loop, as a GGUF file that mixes its formats has them."""
    calls = itertools.count()

    def quantize(weight: torch.Tensor, sources) -> Int8GroupWeights | Int4Weights:
        return (Int4Weights if next(calls) % 2 else Int8GroupWeights).quantize(weight)

    return quantize


QUANTIZATIONS = {
    "int8": Quantization.by_method("int8"),
    "int8-groups": Quantization(head=int8_groups, layers=int8_groups),
    "int4": Quantization.by_method("int4"),
    "mixed": Quantization(head=int8_groups, layers=mixed_formats()),
}


@pytest.mark.skipif(not BLOCKED, reason="int8 codes in column blocks need AVX-512")
@pytest.mark.parametrize("method", QUANTIZATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_int8_codes_in_the_cpp_loop_give_the_python_loops_logits_to_the_bit(
    tiny_model_dir, arch, dtype, method
):
    """int8 codes with a scale per column, or a scale and an offset per group (GGUF's 5-8-bit
    formats), and 4-bit codes (int4, its LM head int8). float32 reads the codes at every row
    count; bfloat16 reads them for a two-token prompt and its dense oneDNN copy for the 69 tokens
    of three."""
    model = load(tiny_model_dir, arch, dtype)
    quantization = QUANTIZATIONS[method]
    for prompts in ([[7, 8]], PROMPTS):
        with torch.inference_mode():
            executor = llama_executor.LlamaExecutor(
                model, DECODER_KERNELS.kernels(), 128, quantization
            )
            assert executor._loop is not None
            attach(model, 128)
            in_cpp = prefill_logits(executor, model, prompts, dtype)
            executor._loop = None
            in_python = prefill_logits(executor, model, prompts, dtype)
            assert torch.equal(in_cpp, in_python)
        model = load(tiny_model_dir, arch, dtype)  # the executor rewrote its weights


def test_torchs_int4_kernel_keeps_the_python_loop(tiny_model_dir, monkeypatch):
    """As without AVX-512 (no column blocks)."""
    monkeypatch.setattr(quantized_linear, "column_block_kernel", lambda weight: None)
    model = load(tiny_model_dir, "llama", torch.bfloat16)
    quantization = Quantization.by_method("int4")
    executor = llama_executor.LlamaExecutor(model, DECODER_KERNELS.kernels(), 128, quantization)
    assert executor._loop is None


def test_the_engine_runs_the_cpp_loop_and_equals_the_python_one(tiny_model_dir, monkeypatch):
    calls = []
    original = llama_executor.LlamaExecutor._layers_in_cpp
    monkeypatch.setattr(
        llama_executor.LlamaExecutor,
        "_layers_in_cpp",
        lambda self, *a: calls.append(1) or original(self, *a),
    )
    in_cpp = mixed_batch_tokens(tiny_model_dir("llama"))
    assert calls
    monkeypatch.setattr(llama_executor, "_loop_weights", lambda layers: None)
    assert mixed_batch_tokens(tiny_model_dir("llama")) == in_cpp
