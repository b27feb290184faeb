"""``baton-paged bench``: latency and throughput through the offline engine, serve against a
running server, each with the figures it claims (token counts exact, every request completed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from baton_paged.bench.datasets import random_samples, sharegpt_samples
from baton_paged.entrypoints import cli

sys.path.insert(0, str(Path(__file__).parent / "server"))
from serving import KEY, serving  # noqa: E402

TINY = ["--max-model-len", "128", "--kv-memory", "16MiB", "--swap-memory", "16MiB"]


def invoke(*args: str) -> dict:
    result = CliRunner().invoke(cli.main, ["bench", *args])
    assert result.exit_code == 0, result.output
    return result


def test_latency_times_one_batch(tiny_model_dir, tmp_path):
    out = tmp_path / "latency.json"
    result = invoke("latency", "--model", str(tiny_model_dir("llama")), *TINY, "--batch-size",
                    "2", "--input-len", "8", "--output-len", "4", "--num-iters", "3",
                    "--num-iters-warmup", "1", "--output-json", str(out))  # fmt: skip
    figures = json.loads(out.read_text())
    assert len(figures["latencies_s"]) == 3 and figures["avg_latency_s"] > 0
    assert "avg_latency_s" in result.output and "latencies_s" not in result.output


def test_throughput_counts_every_token(tiny_model_dir, tmp_path):
    out = tmp_path / "throughput.json"
    invoke("throughput", "--model", str(tiny_model_dir("llama")), *TINY, "--num-prompts", "6",
           "--input-len", "16", "--output-len", "8", "--output-json", str(out))  # fmt: skip
    figures = json.loads(out.read_text())
    assert figures["num_requests"] == 6 and figures["total_num_tokens"] == 6 * (16 + 8)
    assert figures["output_tokens_per_s"] > 0


def test_serve_streams_the_dataset_from_a_running_server(tiny_model_dir, tmp_path):
    path, out = tiny_model_dir("llama"), tmp_path / "serve.json"
    with serving(path) as server:
        invoke("serve", "--base-url", server.url, "--api-key", KEY, "--tokenizer", str(path),
               "--num-prompts", "5", "--input-len", "12", "--output-len", "6", "--request-rate",
               "50", "--max-concurrency", "2", "--output-json", str(out))  # fmt: skip
    figures = json.loads(out.read_text())
    assert figures["completed"] == 5 and figures["failed"] == 0
    assert figures["total_output_tokens"] == 30 and figures["total_input_tokens"] == 60
    assert figures["ttft_s"]["n"] == 5 and figures["tpot_s"]["n"] == 5
    assert figures["itl_s"]["n"] >= 5


def test_serve_refuses_an_unreachable_server():
    result = CliRunner().invoke(cli.main, ["bench", "serve", "--base-url", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and "cannot reach the server" in result.output


def test_datasets(tiny_model_dir, tmp_path):
    samples = random_samples(1000, 20, 50, 10, range_ratio=0.2, seed=3)
    assert all(40 <= s.prompt_len <= 60 and 8 <= s.output_len <= 12 for s in samples)
    assert samples == random_samples(1000, 20, 50, 10, range_ratio=0.2, seed=3)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    talk = [
        {
            "conversations": [
                {"from": "human", "value": f"question number {i} " * 3},
                {"from": "gpt", "value": f"answer {i} " * 4},
            ]
        }
        for i in range(6)
    ]
    talk.append({"conversations": [{"from": "human", "value": "hi"}]})  # no answer: skipped
    data = tmp_path / "sharegpt.json"
    data.write_text(json.dumps(talk))
    picked = sharegpt_samples(data, tokenizer, 4, seed=1)
    assert len(picked) == 4 and all(s.prompt.startswith("question") for s in picked)
    assert picked[0].prompt_len == len(tokenizer(picked[0].prompt).input_ids)
    with pytest.raises(ValueError, match="fewer than 10"):
        sharegpt_samples(data, tokenizer, 10)
