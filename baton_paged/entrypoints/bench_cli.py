"""``baton-paged bench latency|throughput|serve`` (``baton_paged/bench``): vLLM's ``vllm bench``
flags where they exist (``--input-len``, ``--output-len``, ``--num-prompts``,
``--dataset-name random|sharegpt``, ``--dataset-path``, ``--request-rate``,
``--max-concurrency``...). ``latency`` and ``throughput`` build an engine from the same engine
flags as ``serve``; ``serve`` measures a server already running."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from baton_paged.entrypoints.engine_flags import build_engine, engine_options

DATASET_OPTIONS = {
    "dataset_name": click.option("--dataset-name", type=click.Choice(["random", "sharegpt"]),
                                 default="random", show_default=True),
    "dataset_path": click.option("--dataset-path", type=click.Path(exists=True, dir_okay=False),
                                 help="A ShareGPT-style JSON file (with --dataset-name sharegpt)."),
    "num_prompts": click.option("--num-prompts", type=click.IntRange(min=1), default=100,
                                show_default=True),
    "input_len": click.option("--input-len", "--random-input-len", type=click.IntRange(min=1),
                              default=128, show_default=True, help="Random prompts' tokens."),
    "output_len": click.option(
        "--output-len", "--random-output-len", type=click.IntRange(min=1), default=128,
        show_default=True, help="Tokens to generate (sharegpt: instead of each answer's length)."),
    "random_range_ratio": click.option(
        "--random-range-ratio", type=click.FloatRange(0, 1, max_open=True), default=0.0,
        show_default=True, help="Spread of random lengths."),
    "output_json": click.option("--output-json", type=click.Path(dir_okay=False),
                                help="Also write the results there."),
}  # fmt: skip
"""The dataset flags by the argument each sets; the random prompts' seed is the engine's
``--seed`` (``serve``'s own)."""
DATASET = tuple(DATASET_OPTIONS)
LATENCY = ("input_len", "output_len", "output_json")
"""``latency``'s: one batch of random prompts."""


def dataset_options(fn, only: tuple[str, ...] = DATASET):
    """``fn`` with the dataset flags named in ``only``."""
    for name in reversed(only):
        fn = DATASET_OPTIONS[name](fn)
    return fn


def load_samples(args: dict, tokenizer, sharegpt_output_len: int | None = None):
    from baton_paged.bench.datasets import random_samples, sharegpt_samples

    if args["dataset_name"] == "sharegpt":
        if not args["dataset_path"]:
            raise click.UsageError("--dataset-name sharegpt needs --dataset-path FILE.json")
        return sharegpt_samples(args["dataset_path"], tokenizer, args["num_prompts"],
                                sharegpt_output_len, args["seed"])  # fmt: skip
    return random_samples(len(tokenizer), args["num_prompts"], args["input_len"],
                          args["output_len"], args["random_range_ratio"], args["seed"])  # fmt: skip


def finish(title: str, result: dict, output_json: str | None) -> None:
    from baton_paged.bench.runs import report

    click.echo(report(title, result))
    if output_json:
        Path(output_json).write_text(json.dumps(result, indent=2) + "\n")


def take(options: dict, names: tuple[str, ...]) -> dict:
    return {name: options.pop(name) for name in names}


@click.group()
def bench() -> None:
    """Measure this machine: latency, throughput (offline engine) or serve (a running server)."""


@bench.command()
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--num-iters-warmup", type=click.IntRange(min=0), default=3, show_default=True)
@click.option("--num-iters", type=click.IntRange(min=1), default=10, show_default=True)
@lambda fn: dataset_options(fn, LATENCY)
@engine_options
def latency(batch_size, num_iters_warmup, num_iters, **options) -> None:
    """Seconds to generate one batch of --batch-size random prompts end to end."""
    from baton_paged.bench.runs import latency as run
    from baton_paged.entrypoints.llm import LLM

    args = take(options, LATENCY) | {"seed": options["seed"]}
    llm = LLM.from_engine(build_engine(options))
    random = {"dataset_name": "random", "num_prompts": batch_size, "random_range_ratio": 0.0}
    samples = load_samples(args | random, llm.get_tokenizer())
    finish("Latency", run(llm, samples, num_iters_warmup, num_iters), args["output_json"])


@bench.command()
@dataset_options
@engine_options
def throughput(**options) -> None:
    """Requests and tokens per second over --num-prompts prompts in one offline run."""
    from baton_paged.bench.runs import throughput as run
    from baton_paged.entrypoints.llm import LLM

    args = take(options, DATASET) | {"seed": options["seed"]}
    llm = LLM.from_engine(build_engine(options))
    output_len = args["output_len"] if args["dataset_name"] == "sharegpt" else None
    samples = load_samples(args, llm.get_tokenizer(), output_len)
    finish("Throughput", run(llm, samples), args["output_json"])


@bench.command()
@click.option("--base-url", default="http://127.0.0.1:8000", show_default=True)
@click.option("--model", default=None, help="The served model id (default: the server's first).")
@click.option("--tokenizer", default=None,
              help="Tokenizer directory for the dataset (default: the built-in model's, or the "
              "model id as a local directory).")  # fmt: skip
@click.option("--request-rate", default="inf", show_default=True,
              help="Requests per second (Poisson arrivals), or inf: all at once.")  # fmt: skip
@click.option("--max-concurrency", type=click.IntRange(min=1), default=None)
@click.option("--api-key", envvar="OPENAI_API_KEY", default=None)
@click.option("--seed", type=int, default=0, show_default=True, help="Of the dataset and arrivals.")
@dataset_options
def serve(base_url, model, tokenizer, request_rate, max_concurrency, api_key, **options) -> None:
    """Stream --num-prompts completions from a running server; TTFT, TPOT, ITL, throughput."""
    import httpx

    from baton_paged.bench.runs import serve as run

    args = options
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        cards = httpx.get(f"{base_url.rstrip('/')}/v1/models", headers=headers, timeout=10)
        model = model or cards.raise_for_status().json()["data"][0]["id"]
    except httpx.HTTPError as error:
        raise click.UsageError(f"cannot reach the server at {base_url}: {error}") from None
    rate = None if request_rate == "inf" else float(request_rate)
    if rate is not None and not rate > 0:
        raise click.UsageError("--request-rate must be > 0 or inf")
    output_len = args["output_len"] if args["dataset_name"] == "sharegpt" else None
    samples = load_samples(args, bench_tokenizer(tokenizer, model), output_len)
    result = run(base_url, model, samples, rate, max_concurrency, args["seed"], api_key)
    finish("Serving Benchmark Result", result, args["output_json"])


def bench_tokenizer(tokenizer: str | None, model: str):
    """The tokenizer the dataset is made with: ``--tokenizer``, a built-in model's (the default
    or ``random``) when the server runs it, or the model id read as a local directory."""
    from transformers import AutoTokenizer

    from baton_paged.entrypoints.model_id import DEFAULT_ALIAS, DEFAULT_MODEL_ID
    from baton_paged.model.loading import checkpoint_path

    source = tokenizer
    if source is None:
        source = checkpoint_path(None if model in (DEFAULT_MODEL_ID, DEFAULT_ALIAS) else model)
    if not os.path.isdir(source):
        raise click.UsageError(f"no tokenizer directory {source!r}: pass --tokenizer DIR")
    return AutoTokenizer.from_pretrained(source)
