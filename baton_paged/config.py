"""EngineConfig: every knob of one engine, validated once, documented once.

Each field's docstring is the help text the CLI and the server show for it, so the two never
drift apart. Validation happens in ``__post_init__``: a bad value fails before any model loads.
It imports no policies, backends or plugins: the names plugins can extend are checked against
their registries where an engine is built (``registries.check_registered``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from baton_paged.allocator.memory_budget import parse_memory_budget
from baton_paged.sched.memory_monitor import check_watermarks

PREEMPTION_MODES = ("swap", "recompute")
MODEL_IMPLS = ("auto", "native", "transformers")
QUANTIZATIONS = ("int8", "int4", "gguf", "fp8")


def cpu_computes_bfloat16() -> bool:
    """Does this CPU have bfloat16 arithmetic (AVX512-BF16 or AMX tiles)? There, bfloat16 halves
    the bytes a decode step reads and oneDNN's matmuls run natively: 1.4-1.5x float32's single
    stream on this project's benchmark VM. Elsewhere it would be emulated, slower than float32."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None
    """Local checkpoint directory, GGUF file (dequantized on load) or Hugging Face hub id;
    None = the built-in SmolLM2-135M-Instruct (fetched from the package index and cached on first
    use); 'random' = a random-weight ~28M Llama built locally (no download, its text is noise)."""
    dtype: str = "auto"
    """Weights, activations and KV cache dtype: float32, float64, float16, bfloat16, or auto
    (bfloat16 on CUDA, where flash-attn and the tensor cores want it; on the CPU bfloat16 where it
    computes it natively (AVX512-BF16 or AMX, as vLLM's CPU build decides), else float32)."""
    device: str = "cpu"
    """torch device the model and KV cache live on (cpu, cuda, cuda:1, ...)."""
    policy: str = "baton"
    """Batching policy: baton (separate prefill, insert/remove between iterations), orca (prompts
    prefilled inside the decode iteration), static (run-to-completion batches), chunked (decode +
    prefill chunks under a token budget)."""
    attention_backend: str = "auto"
    """cpu_paged (the CPU kernel reading pages in place), torch, padded, flash_attn, xformers,
    triton, or auto (the fastest that runs on the device: cpu_paged on the CPU when its kernels
    build, else torch; on CUDA flash_attn, xformers, triton, padded, then torch)."""
    model_impl: str = "auto"
    """How the model's forward runs (vLLM's name): native (the fused Llama-family executor:
    Llama, SmolLM2, Mistral, Qwen2 on the CPU kernels), transformers (the unmodified HF model
    through the paged attention bridge; every causal LM), or auto (native where it applies)."""
    quantization: str | None = None
    """Quantized linears (vLLM's name). On the CPU, weight-only, in the native executor: int8 (a
    scale per output channel) or int4 (a scale and a zero per 32 inputs, llama.cpp's Q4_1 layout),
    quantized as the model loads, the LM head (and a tied embedding) int8 in both; or gguf, a GGUF
    checkpoint's linears read at the file's own width (``gguf_weights.py``). Activations and the
    KV cache stay in dtype; the quantized kernels run for bfloat16 decode steps of a few rows, the
    rest runs the same weights dequantized. On CUDA (bfloat16, the bridge; ``cuda_quantized.py``):
    int4 (the same groups, on torch's tinygemm kernel, compute capability 8.0+) or fp8 (e4m3
    weights per output channel and activations per token on ``torch._scaled_mm``, 9.0+), every
    linear but the LM head. None: gguf for a GGUF checkpoint and for the built-in
    default model (whose source is a Q4_1 file) when they run in bfloat16 on the native executor,
    where it measures faster (benchmarks/bench_quantized.py), else the weights at dtype (float32
    opts out). int8 and gguf run on the CPU, where the native executor runs the model (Llama,
    SmolLM2, Mistral, Qwen2); every method on checkpoints the engine loads: an explicit method
    anywhere else is an error, never ignored."""
    enforce_eager: bool = False
    """Run every step eagerly (vLLM's name). Otherwise decode steps on CUDA replay CUDA graphs
    captured at startup for batch sizes 1, 2, 4 and multiples of 8 (triton and flash_attn
    backends); the CPU always runs eagerly."""
    async_scheduling: bool | None = None
    """Plan and launch each iteration before reading the previous one's tokens, so the host's
    work hides behind the GPU's (vLLM's name); None = on for CUDA, off on the CPU, where the
    forward and the host work share the same cores."""
    enable_prefix_caching: bool = True
    """Share computed K/V pages between requests with a common prefix (vLLM's name): a request
    starts from its longest cached prefix of full pages, and freed pages stay cached until the
    pool needs them."""
    page_size: int | None = None
    """Tokens per KV page; None = the attention backend's preference (16, or 256 for
    flash_attn)."""
    kv_memory: str = "1GiB"
    """KV cache budget: bytes ('4GiB', '512MB') or a fraction of free device memory ('0.8')."""
    max_batch_size: int = 32
    """Most requests decoding together (batch slots)."""
    max_model_len: int | None = None
    """Longest prompt + output in tokens; None = the model's max_position_embeddings."""
    generation_config: str = "auto"
    """Sampling defaults for requests that leave them unset: ``auto`` takes the model's
    ``generation_config.json`` (its temperature, top_p, top_k, min_p, repetition_penalty and
    max_new_tokens, as vLLM does), ``vllm`` ignores it, a directory reads that one's."""
    max_logprobs: int = 20
    """Most log-probabilities a request may ask for per token (``logprobs``, ``top_logprobs``,
    ``prompt_logprobs``; vLLM's name and default); a request asking for more is refused."""
    max_prefill_tokens: int = 4096
    """Most prompt tokens one prefill forward packs (a longer single prompt still runs alone)."""
    max_num_batched_tokens: int = 512
    """Token budget of one forward under the chunked policy (decode tokens + prefill chunks)."""
    seed: int = 0
    """Seed of the sampler's default generator (requests may carry their own seed)."""
    preemption_mode: str = "swap"
    """How a preempted request leaves the device: swap (copy its K/V to the host swap pool when
    that has room, else recompute) or recompute (free its pages; prefill prompt + output again
    when it resumes)."""
    swap_memory: str = "1GiB"
    """Host swap pool: bytes ('4GiB') or a fraction of available host memory ('0.1'), capped at
    the device pool's page count; '0' turns swapping off."""
    memory_high_watermark: float = 0.95
    """Memory pressure (page-pool occupancy, or device memory in use when watched) above which
    the batch stops growing and sheds one request per iteration to host memory."""
    memory_low_watermark: float = 0.85
    """Pressure below which a shrunk batch grows again; the gap to the high watermark is the
    hysteresis that stops requests swapping out and in on alternate iterations."""
    watch_device_memory: bool = False
    """Count device memory in use (NVML, else torch.cuda.mem_get_info; psutil on the CPU) as
    pressure too. Off by default: the KV pools are allocated up front, so the reading tracks
    other processes and activations rather than the cache."""

    def __post_init__(self) -> None:
        check_choice("dtype", self.dtype, [*DTYPES, "auto"])
        for name in ("max_batch_size", "max_prefill_tokens", "max_num_batched_tokens"):
            _check_int(name, getattr(self, name))
        for name in ("page_size", "max_model_len"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name))
        _check_int("max_logprobs", self.max_logprobs, minimum=0)
        check_choice("preemption_mode", self.preemption_mode, PREEMPTION_MODES)
        check_choice("model_impl", self.model_impl, MODEL_IMPLS)
        if self.quantization is not None:
            check_choice("quantization", self.quantization, QUANTIZATIONS)
        if self.swap_memory != "0":
            parse_memory_budget(self.swap_memory)
        check_watermarks(self.memory_high_watermark, self.memory_low_watermark)
        torch.device(self.device)  # raises on a malformed device string

    @property
    def swapping(self) -> bool:
        return self.preemption_mode == "swap" and self.swap_memory != "0"

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            on_cuda = torch.device(self.device).type == "cuda"
            return torch.bfloat16 if on_cuda or cpu_computes_bfloat16() else torch.float32
        return DTYPES[self.dtype]


def check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
