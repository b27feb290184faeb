"""The whole engine on CUDA: each GPU attention path's greedy output equals HF ``generate`` on
the same device (float32), under every policy, with decode replayed from CUDA graphs where the
backend can be captured and eagerly otherwise. Skipped without a CUDA device."""

from __future__ import annotations

import random

import pytest
import torch
from equivalence import check
from transformers import AutoModelForCausalLM, AutoTokenizer

from baton_paged.attention.base import AttentionRequirements
from baton_paged.attention.registry import backend_class, create_backend
from baton_paged.config import EngineConfig
from baton_paged.engine import Engine
from baton_paged.sampling_params import SamplingParams
from baton_paged.sched import device_memory

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_reference(tiny_model_dir):
    models = {}

    def generate(arch, prompt, max_tokens):
        if arch not in models:
            path = tiny_model_dir(arch)
            models[arch] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda()
        ids = torch.tensor([prompt], device="cuda")
        out = models[arch].generate(ids, max_new_tokens=max_tokens, do_sample=False,
                                    attention_mask=torch.ones_like(ids))  # fmt: skip
        return tuple(out[0, len(prompt) :].tolist())

    return generate


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
@pytest.mark.parametrize("policy", ["baton", "orca", "static", "chunked"])
@pytest.mark.parametrize("backend", ["triton", "flash_attn", "xformers", "padded", "torch"])
def test_greedy_on_cuda_equals_generate(
    tiny_model_dir, cuda_reference, backend, policy, enforce_eager
):
    req = AttentionRequirements(torch.device("cuda"), torch.float32, 16, 16, 4, 2)
    reason = backend_class(backend).unsupported_reason(req)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    path = tiny_model_dir("llama")
    graph_safe = type(create_backend(backend, req)).graph_safe  # the form chosen for 16 pages
    if enforce_eager and not graph_safe:
        pytest.skip(f"{backend} always runs eagerly at these pages")
    options = {"page_size": 16, "policy": policy, "max_batch_size": 6, "kv_memory": "64MiB"}
    config = EngineConfig(model=str(path), device="cuda", attention_backend=backend,
                          dtype="float32", enforce_eager=enforce_eager, **options)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(path).cuda()
    engine = Engine(config, model, AutoTokenizer.from_pretrained(path))
    graphs = graph_safe and not enforce_eager
    assert (engine.runner.graphs is not None) == graphs, "a capture failed: see the warning"
    rng = random.Random(5)
    workload = [(tuple(rng.randrange(500) for _ in range(rng.randint(1, 40))),
                 rng.randint(1, 20), rng.randint(0, 8)) for _ in range(8)]  # fmt: skip
    check(engine, workload, cuda_reference, "llama")


def cuda_engine(path, **options) -> Engine:
    dtype = options.pop("dtype", torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).cuda()
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
    config = EngineConfig(model=str(path), device="cuda", dtype=names[dtype], **options)
    return Engine(config, model, AutoTokenizer.from_pretrained(path))


def test_bfloat16_logits_are_close_to_hf(tiny_model_dir):
    """bf16 greedy tokens may flip on near-ties, so compare prompt log-probabilities instead."""
    path = tiny_model_dir("llama")
    engine = cuda_engine(path, dtype=torch.bfloat16, page_size=16, kv_memory="64MiB")
    assert engine.snapshot.attention_backend in ("flash_attn", "xformers", "triton")
    prompt = [(5 * i + 7) % 500 for i in range(48)]
    engine.add_request(prompt, SamplingParams(max_tokens=1, prompt_logprobs=0), "r")
    while engine.has_unfinished_requests():
        outputs = engine.step()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
    with torch.no_grad():
        expected = model(torch.tensor([prompt], device="cuda")).logits[0].float().log_softmax(-1)
    for position, entry in enumerate(outputs[0].prompt_logprobs[1:]):
        token = prompt[position + 1]
        assert abs(entry[token].logprob - float(expected[position, token])) < 0.1


def test_swap_preemption_through_the_pinned_pool_on_cuda(tiny_model_dir, cuda_reference):
    path = tiny_model_dir("llama")
    # 12 pages of 16 tokens; the four requests need 16 (20 prompt + 40 new tokens each)
    engine = cuda_engine(path, page_size=16, kv_memory="96KiB", max_batch_size=4)
    assert engine.host is not None and engine.host.pinned
    rng = random.Random(2)
    workload = [(tuple(rng.randrange(500) for _ in range(20)), 40, arrival)
                for arrival in (0, 0, 1, 3)]  # fmt: skip
    check(engine, workload, cuda_reference, "llama")
    assert engine.stats.swap_preemptions > 0 and engine.stats.pages_swapped_in > 0


def test_nvml_reads_the_device_the_engine_uses():
    import pynvml  # nvidia-ml-py is a dependency: a missing one is a failure, not a skip

    pynvml.nvmlInit()
    handle = device_memory._nvml_handle(pynvml, torch.device("cuda:0"))
    uuid = pynvml.nvmlDeviceGetUUID(handle)
    uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
    assert uuid.split("-", 1)[1] == str(torch.cuda.get_device_properties(0).uuid).removeprefix(
        "GPU-"
    )
    reader = device_memory.beyond_baseline(device_memory.device_memory_reader("cuda:0"))
    assert 0.0 <= reader() <= 1.0
