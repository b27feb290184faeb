"""The `baton-paged` command line."""

import json
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import transformers
from click.testing import CliRunner
from transformers import AutoConfig

from baton_paged.entrypoints import cli
from baton_paged.model.builder import ARCHS, SIZES


def test_make_model_writes_a_loadable_checkpoint(tmp_path):
    result = CliRunner().invoke(
        cli.main, ["make-model", str(tmp_path / "m"), "--arch", "gpt2", "--size", "tiny"]
    )
    assert result.exit_code == 0, result.output
    assert "random-weight gpt2 (tiny)" in result.output
    assert AutoConfig.from_pretrained(tmp_path / "m").model_type == "gpt2"


def test_make_model_rejects_unknown_arch(tmp_path):
    result = CliRunner().invoke(cli.main, ["make-model", str(tmp_path / "m"), "--arch", "mamba"])
    assert result.exit_code == 2 and "'mamba' is not one of" in result.output
    assert not (tmp_path / "m").exists()


def test_cli_choices_match_the_builder():
    # The CLI keeps its own copy so `--help` needs no torch import; this keeps the two in step.
    assert cli.ARCH_CHOICES == ARCHS and cli.SIZE_CHOICES == tuple(SIZES)


def test_version():
    result = CliRunner().invoke(cli.main, ["--version"])
    assert result.exit_code == 0 and "0.1.0" in result.output


def test_serve_options_are_the_engine_config_fields_with_their_docs():
    import dataclasses

    from baton_paged.config import EngineConfig

    result = CliRunner().invoke(cli.main, ["serve", "--help"])
    assert result.exit_code == 0
    for field in dataclasses.fields(EngineConfig):
        assert f"--{field.name.replace('_', '-')}" in result.output
    assert "KV cache budget: bytes" in " ".join(result.output.split())
    assert "--api-key" in result.output and "127.0.0.1" in result.output


def test_bad_engine_option_is_a_usage_error_before_any_model_loads(tmp_path):
    result = CliRunner().invoke(cli.main, ["generate", "hi", "--policy", "fifo"])
    assert result.exit_code == 2 and "unknown policy 'fifo'" in result.output


def test_generate_prints_a_completion(tiny_model_dir):
    args = ["generate", "def main():", "--model", str(tiny_model_dir("llama")), "--max-tokens", "4"]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_serve(model_dir, port: int) -> subprocess.Popen:
    command = [
        sys.executable,
        "-c",
        "from baton_paged.entrypoints.cli import main; main()",
        "serve",
    ]
    args = ["--model", str(model_dir), "--port", str(port), "--max-model-len", "128"]
    return subprocess.Popen(command + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_healthy(server: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 180  # a liveness bound: a loaded CI machine starts slowly
    while True:
        assert server.poll() is None, server.stdout.read().decode()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server never became healthy"
        time.sleep(0.2)


def test_serve_answers_and_stops_cleanly_on_sigterm(tiny_model_dir):
    port = free_port()
    server = start_serve(tiny_model_dir("llama"), port)
    try:
        wait_healthy(server, port)
        model_id = tiny_model_dir("llama").name  # the directory's name, never its path
        body = {"model": model_id, "prompt": "hi", "max_tokens": 3}
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
        assert reply.json()["model"] == model_id
        busy = start_serve(tiny_model_dir("llama"), port)  # the same port: it must fail, not hang
        assert busy.wait(timeout=60) == 1 and b"address already in use" in busy.stdout.read()
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    log = server.stdout.read().decode()
    assert "[baton_paged.requests] Finished request cmpl-" in log  # vLLM logs each request
    assert re.search(r"length; prompt \d+ tokens \(0 cached\), generated 3 in 1 choice", log), log


def test_sigterm_lets_a_stream_in_flight_finish_before_exiting(tiny_model_dir):
    port = free_port()
    server = start_serve(tiny_model_dir("llama"), port)
    try:
        wait_healthy(server, port)
        body = {"prompt": "x", "max_tokens": 120, "ignore_eos": True, "stream": True}
        url = f"http://127.0.0.1:{port}/v1/completions"
        with httpx.stream("POST", url, json=body, timeout=60) as reply:
            events = []
            for line in reply.iter_lines():
                if line.startswith("data:"):
                    events.append(line)
                    if len(events) == 1:
                        server.send_signal(signal.SIGTERM)
        assert events[-1] == "data: [DONE]"
        finish = json.loads(events[-2][len("data: ") :])["choices"][0]["finish_reason"]
        assert finish == "length", "the stream ran to its end, not cut off by the shutdown"
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()


def test_replicas_are_checked_before_ray_starts():
    result = CliRunner().invoke(cli.main, ["serve", "--replicas", "0"])
    assert result.exit_code == 2 and "--replicas" in result.output
    result = CliRunner().invoke(cli.main, ["serve", "--replicas", "2", "--policy", "fifo"])
    assert result.exit_code == 2 and "unknown policy 'fifo'" in result.output


def assert_one_error_line(result, *words: str) -> None:
    """Exit 2, exactly one ``Error:`` line holding ``words``, and no traceback."""
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 2, result.output
    assert len(errors) == 1 and all(word in errors[0] for word in words), result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, AssertionError)


def test_cuda_without_cuda_says_use_cpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(cli.main, ["generate", "hi", "--device", "cuda"])
    assert_one_error_line(result, "CUDA is not available", "--device cpu")


def test_a_model_path_that_is_not_a_directory(tmp_path):
    for model, words in (
        (str(tmp_path / "nonexistent"), "no such directory"),
        (__file__, "not a directory"),
    ):
        result = CliRunner().invoke(cli.main, ["generate", "hi", "--model", model])
        assert_one_error_line(result, model, words)


def test_a_hub_id_that_cannot_be_loaded_is_one_line(monkeypatch):
    import huggingface_hub.constants

    # Never reach for the network (here it would retry an unreachable hub for ~45 s): the hub
    # library read HF_HUB_OFFLINE when it was imported, so its constant is set as well.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    result = CliRunner().invoke(cli.main, ["generate", "hi", "--model", "nosuch/model-xyz"])
    assert_one_error_line(result, "cannot load --model 'nosuch/model-xyz'", "checkpoint directory")


def test_a_backend_that_cannot_run_and_a_kv_budget_below_one_page(tiny_model_dir):
    model = ["--model", str(tiny_model_dir("llama"))]
    for options, words in (
        (["--attention-backend", "flash_attn", "--device", "cpu"], "cannot run here"),
        (["--kv-memory", "1000"], "holds no page"),
    ):
        for command in (["generate", "hi"], ["serve"]):
            result = CliRunner().invoke(cli.main, [*command, *model, *options])
            assert_one_error_line(result, words)


def test_make_model_into_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    result = CliRunner().invoke(cli.main, ["make-model", str(tmp_path / "file" / "m")])
    assert_one_error_line(result, "cannot write")


def test_serve_limits_are_flags_and_a_bad_one_is_a_usage_error():
    result = CliRunner().invoke(cli.main, ["serve", "--help"])
    for flag in ("--max-best-of", "--max-body-bytes", "--read-timeout", "--max-logprobs"):
        assert flag in result.output
    result = CliRunner().invoke(cli.main, ["serve", "--model", "random", "--max-body-bytes", "0"])
    assert result.exit_code == 2 and "max_body_bytes must be a positive number" in result.output


def test_a_vllm_launch_line_with_only_the_command_changed_starts_the_server(
    tiny_model_dir, tmp_path
):
    """``vllm serve MODEL --served-model-name a b --max-num-seqs ... --chat-template FILE``: the
    positional model, several names (any accepted, the first in replies), vLLM's engine flags,
    and a template file the chat route renders with."""
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}>")
    port = free_port()
    vllm_line = [
        str(tiny_model_dir("llama")), "--served-model-name", "first", "second",
        "--max-num-seqs", "4", "--block-size", "16", "--swap-space", "1",
        "--tensor-parallel-size", "1", "--gpu-memory-utilization", "0.9", "--disable-log-requests",
        "--disable-log-stats", "--uvicorn-log-level", "warning", "--chat-template", str(template),
        "--max-model-len", "128", "--port", str(port), "--dtype", "float32",
    ]  # fmt: skip
    command = [sys.executable, "-c", "from baton_paged.entrypoints.cli import main; main()"]
    server = subprocess.Popen(
        [*command, "serve", *vllm_line], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        wait_healthy(server, port)
        url = f"http://127.0.0.1:{port}/v1"
        assert [m["id"] for m in httpx.get(f"{url}/models").json()["data"]] == ["first", "second"]
        body = {"model": "second", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        reply = httpx.post(f"{url}/chat/completions", json=body, timeout=30).json()
        assert reply["model"] == "first"
        rendered = "[user] hi\n>"  # the template file's rendering, tokenized
        tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
        assert reply["usage"]["prompt_tokens"] == len(tokenizer(rendered).input_ids)
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    assert b"Finished request" not in server.stdout.read()  # --disable-log-requests


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["MODEL", "--model", "other"], "disagree"),
        (["a", "b"], "unexpected arguments"),
        (["--tensor-parallel-size", "2"], "tensor_parallel_size=2 is not supported"),
        (
            ["--quantization", "awq"],
            "unknown quantization 'awq'; choose one of: int8, int4, gguf, fp8",
        ),
        (["-q", "awq"], "unknown quantization 'awq'; choose one of: int8, int4, gguf, fp8"),
        (["--trust-remote-code"], "trust_remote_code=True is not supported"),
        (["--page-size", "16", "--block-size", "32"], "disagree"),
        (["M", "--chat-template", "x", "--replicas", "2"], "--replicas serves the tokenizer's"),
        (["--enable-log-requests", "--disable-log-requests"], "disagree"),
    ],
)
def test_vllm_flags_that_cannot_work_are_usage_errors(args, words):
    result = CliRunner().invoke(cli.main, ["serve", *args])
    assert result.exit_code == 2 and words in result.output, result.output
