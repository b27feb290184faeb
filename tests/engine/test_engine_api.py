"""The offline API and the engine's guard rails: vLLM-shaped calls, clear errors, counters."""

from __future__ import annotations

import pytest
import torch

from baton_paged import config as config_module
from baton_paged.config import EngineConfig
from baton_paged.engine import Engine
from baton_paged.entrypoints.llm import LLM
from baton_paged.registries import check_registered
from baton_paged.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6)


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ("", GREEDY, "prompt is empty"),
        ({"prompt_token_ids": []}, GREEDY, "prompt is empty"),
        ({"prompt_token_ids": [1, 10**6]}, GREEDY, "token ids must be ints"),
        ({"text": "x"}, GREEDY, r"prompt keys \['text'\] are not supported"),
        ({}, GREEDY, "needs 'prompt' or 'prompt_token_ids'"),
        ({"prompt_token_ids": [1] * 64}, GREEDY, "leaving no room"),
        ({"prompt_token_ids": [1] * 30}, SamplingParams(max_tokens=30), "KV pages"),
        ("hello", "not params", "expected SamplingParams"),
    ],
)
def test_bad_request_is_refused_before_anything_is_queued(make_engine, prompt, params, message):
    engine = make_engine(max_model_len=64, page_size=16, kv_memory="48KiB")  # 3 pages
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, params)
    assert not engine.has_unfinished_requests() and not engine.requests
    assert engine.cache.pool.num_used == 0


def test_duplicate_request_id_and_bad_priority(make_engine):
    engine = make_engine()
    engine.add_request("hello", GREEDY, request_id="a")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("hello", GREEDY, request_id="a")
    with pytest.raises(ValueError, match="priority must be an int"):
        engine.add_request("hello", GREEDY, priority="high")
    assert list(engine.requests) == ["a"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("policy", "fifo", "unknown policy 'fifo'"),
        ("attention_backend", "flash", "unknown attention_backend 'flash'"),
        ("max_batch_size", 0, "max_batch_size must be a positive integer"),
        ("dtype", "int8", "unknown dtype"),
        ("preemption_mode", "drop", "unknown preemption_mode 'drop'"),
        ("swap_memory", "lots", "not a memory budget"),
        ("memory_low_watermark", 0.99, "0 < low < high <= 1"),
        ("memory_high_watermark", 1.5, "0 < low < high <= 1"),
    ],
)
def test_bad_engine_config_is_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        check_registered(EngineConfig(**{field: value}))


def test_an_unknown_policy_fails_before_any_model_loads(monkeypatch):
    def no_loading(config):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("baton_paged.engine.load_model", no_loading)
    with pytest.raises(ValueError, match="unknown policy 'fifo'"):
        Engine(EngineConfig(policy="fifo"))


def test_llm_generate_takes_vllm_shaped_prompts_and_keeps_their_order(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), dtype="float64", max_batch_size=2)
    prompts = ["def main():", {"prompt_token_ids": [5, 6, 7]}, {"prompt": "import os"}]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 9, 5)]
    outputs = llm.generate(prompts, params)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [3, 9, 5]
    assert [o.outputs[0].finish_reason for o in outputs] == ["length"] * 3
    assert outputs[0].prompt == "def main():" and outputs[1].prompt_token_ids == (5, 6, 7)
    tokenizer = llm.get_tokenizer()
    for output in outputs:
        assert output.outputs[0].text == tokenizer.decode(output.outputs[0].token_ids)
        assert output.finished and output.metrics.time_to_first_token > 0
        assert len(output.metrics.inter_token_latencies) == len(output.outputs[0].token_ids) - 1


def test_llm_validates_every_prompt_before_queuing_any(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), dtype="float64")
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate(["fine", ""], GREEDY)
    assert not llm.engine.has_unfinished_requests()


def test_stop_token_ids_min_tokens_and_stop_strings(make_engine):
    engine = make_engine()
    free = engine.add_request("abc", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    tokens = list(_finish(engine)[free].outputs[0].token_ids)

    stop_id = tokens[3]
    first = tokens.index(stop_id) + 1
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop_token_ids=[stop_id])
    stopped = _finish(engine, engine.add_request("abc", params))
    assert stopped.outputs[0].token_ids == tuple(tokens[:first])
    assert (stopped.outputs[0].finish_reason, stopped.outputs[0].stop_reason) == ("stop", stop_id)

    text = engine.tokenizer.decode(tokens)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop=[stop])
    cut = _finish(engine, engine.add_request("abc", params)).outputs[0]
    assert cut.text == text[: text.index(stop)] and cut.stop_reason == stop


def test_streamed_snapshots_never_show_text_a_stop_string_cuts(make_engine):
    """Each snapshot's text is a prefix of the final text, for stop strings that straddle
    token boundaries (the start arrives a token before the end)."""
    engine = make_engine()
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    text = _finish(engine, engine.add_request("abc", free)).outputs[0].text
    for start in range(2, len(text) - 3):
        stop = text[start : start + 3]
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop])
        request_id = engine.add_request("abc", params)
        snapshots = []
        while engine.has_unfinished_requests():
            snapshots += [o.outputs[0].text for o in engine.step() if o.request_id == request_id]
        assert snapshots[-1] == text[: text.index(stop)]
        assert all(snapshots[-1].startswith(s) for s in snapshots), (stop, snapshots)


def test_min_tokens_suppresses_stop_token_ids(make_engine):
    """The greedy first token, made a stop id, may not be produced before min_tokens."""
    engine = make_engine()
    free = _finish(engine, engine.add_request("abc", SamplingParams(temperature=0, max_tokens=4)))
    first = free.outputs[0].token_ids[0]
    params = SamplingParams(temperature=0, max_tokens=4, min_tokens=2, stop_token_ids=[first])
    out = _finish(engine, engine.add_request("abc", params)).outputs[0]
    assert out.token_ids[0] != first and len(out.token_ids) >= 2


def test_abort_frees_pages_at_once_wherever_the_request_is(make_engine):
    engine = make_engine(max_batch_size=1)
    running = engine.add_request("one", SamplingParams(max_tokens=50, ignore_eos=True))
    waiting = engine.add_request("two", SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.cache.pool.num_used > 0
    assert engine.abort_request(waiting).outputs[0].finish_reason == "abort"
    assert engine.abort_request(running).outputs[0].finish_reason == "abort"
    assert engine.cache.pool.num_used == 0 and not engine.has_unfinished_requests()
    assert engine.abort_request(running) is None
    engine.scheduler.check_integrity()


def _finish(engine, request_id=None):
    """Step until idle; the final outputs by request id (or the one asked for)."""
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    return finished if request_id is None else finished[request_id]


@pytest.mark.parametrize(("arch", "expected"), [("llama", (0, 2)), ("gpt2", (0,))])
def test_every_generation_config_eos_ends_a_request(make_engine, arch, expected):
    """Chat models list their end-of-turn token (<|im_end|> = 2) beside EOS in the generation
    config; HF generate stops on both, so the engine must too (the preemption equivalence test
    meets one)."""
    engine = make_engine(arch)
    assert engine.inputs.eos_token_ids == expected
    engine.add_request("hi", SamplingParams(temperature=0, max_tokens=8, min_tokens=3))
    request = next(iter(engine.requests.values()))
    assert set(expected) <= set(engine.outputs.suppressed_token_ids(request))


def test_peak_pages_include_the_last_step_of_a_finishing_request(make_engine):
    """6 prompt + 4 new tokens on pages of 4: the last step computes position 8, so 3 pages are
    held at once, even though they return to the pool within that same step."""
    engine = make_engine(page_size=4)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request({"prompt_token_ids": [5] * 6}, params)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats.peak_pages_in_use == 3 and engine.snapshot.device_pages_used == 0


@pytest.mark.parametrize("native_bf16", [True, False])
def test_dtype_auto_follows_the_device(monkeypatch, native_bf16):
    """float32 on CUDA rules flash-attn out and runs at a fraction of the tensor cores' speed;
    on a CPU, bfloat16 where it computes it natively (as vLLM's CPU build), else float32."""
    monkeypatch.setattr(config_module, "cpu_computes_bfloat16", lambda: native_bf16)
    assert EngineConfig().dtype == "auto"
    assert EngineConfig().torch_dtype == (torch.bfloat16 if native_bf16 else torch.float32)
    assert EngineConfig(device="cuda").torch_dtype == torch.bfloat16
    assert EngineConfig(device="cuda", dtype="float16").torch_dtype == torch.float16


def test_a_checkpoint_loads_straight_onto_the_device(tiny_model_dir, monkeypatch):
    """``device_map``: no full host copy first."""
    from transformers import AutoModelForCausalLM

    from baton_paged.model.loading import load_model

    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(path, **kwargs):
        seen.update(kwargs)
        return real(path, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    model, _ = load_model(EngineConfig(model=str(tiny_model_dir("llama")), dtype="float32"))
    assert seen["device_map"] == "cpu" and seen["dtype"] == torch.float32
    assert next(model.parameters()).dtype == torch.float32
