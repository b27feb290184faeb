"""vLLM's ``vllm serve`` launch line on ``baton-paged serve``: the model as a positional argument
and vLLM's flag names, so that an existing launch line starts this server with only the command
name changed.

Engine flags become ``EngineConfig`` fields through the same translation as ``LLM(**vllm_args)``
(``vllm_args.py``): ``--max-num-seqs`` (``--max-batch-size``), ``--block-size``
(``--page-size``), ``--swap-space`` (GiB), ``--gpu-memory-utilization`` (the KV cache's share of
free GPU memory; on the CPU, as in vLLM's CPU build, ``--kv-memory`` sizes it),
``--tensor-parallel-size`` / ``--pipeline-parallel-size`` (1 only), ``--trust-remote-code``
(refused); ``--quantization`` is an engine flag of our own under the same name (int8, int4, gguf).
Server flags: ``--served-model-name`` takes several names as vLLM does (``--served-model-name
a b``: the first is the id replies carry, every one is accepted as ``model``),
``--chat-template`` (a file or the template itself),
``--uvicorn-log-level``, ``--disable-log-requests`` (no line per finished request;
``--enable-log-requests``, vLLM's newer spelling, keeps the default), ``--disable-log-stats``
(no periodic stats line) and ``--enable-tokenizer-info-endpoint``. A flag given in both
spellings with different values is an error, never a silent choice.
"""

from __future__ import annotations

from pathlib import Path

import click

UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
ENGINE_FLAGS = {
    "max_num_seqs": ("max_batch_size", "vLLM's name for --max-batch-size."),
    "block_size": ("page_size", "vLLM's name for --page-size."),
}
"""vLLM flag -> (our EngineConfig field it sets, help)."""


def vllm_serve_options(fn):
    """``fn`` with vLLM's ``serve`` flags and its positional model arguments (``MODEL``, then any
    further ``--served-model-name`` values, which click cannot take as one option's list)."""
    options = [
        click.argument("positional", nargs=-1, metavar="[MODEL]"),
        click.option("--max-num-seqs", type=click.IntRange(min=1), default=None,
                     help=ENGINE_FLAGS["max_num_seqs"][1]),
        click.option("--block-size", type=click.IntRange(min=1), default=None,
                     help=ENGINE_FLAGS["block_size"][1]),
        click.option("--swap-space", type=click.FloatRange(min=0), default=None,
                     help="vLLM's host swap space in GiB (sets --swap-memory)."),
        click.option("--gpu-memory-utilization", type=float, default=None,
                     help="vLLM: the KV cache's share of free GPU memory (sets --kv-memory on "
                     "CUDA; on the CPU --kv-memory sizes the cache, as in vLLM's CPU build)."),
        click.option("--tensor-parallel-size", "-tp", type=int, default=None,
                     help="vLLM: 1 only (one device per engine; --replicas scales out)."),
        click.option("--pipeline-parallel-size", "-pp", type=int, default=None,
                     help="vLLM: 1 only."),
        click.option("--trust-remote-code", is_flag=True, default=None,
                     help="vLLM: refused (no model code is run from a checkpoint)."),
        click.option("--chat-template", default=None,
                     help="A Jinja chat template, or a file holding one, for /v1/chat/completions "
                     "instead of the tokenizer's."),
        click.option("--uvicorn-log-level", type=click.Choice(UVICORN_LOG_LEVELS),
                     default="info", show_default=True, help="uvicorn's log level."),
        click.option("--enable-tokenizer-info-endpoint", is_flag=True,
                     help="Serve GET /tokenizer_info (the tokenizer's settings and chat "
                     "template; lm-eval tokenizes through it)."),
        click.option("--disable-log-requests", is_flag=True,
                     help="Write no log line per finished request."),
        click.option("--enable-log-requests", is_flag=True,
                     help="vLLM's newer spelling: a line per finished request (the default)."),
        click.option("--disable-log-stats", is_flag=True,
                     help="Write no periodic stats line (/metrics still serves them)."),
    ]  # fmt: skip
    for option in reversed(options):
        fn = option(fn)
    return fn


def take_vllm_flags(options: dict, ctx: click.Context) -> dict:
    """Fold vLLM's engine flags in ``options`` into our fields (in place) and return the
    server's: ``served_model_names``, ``chat_template``, ``uvicorn_log_level``,
    ``tokenizer_info``, ``log_requests``, ``log_stats``."""
    from baton_paged.entrypoints.vllm_args import engine_options

    positional = list(options.pop("positional"))
    names = list(options.pop("served_model_name") or ())
    _take_model(options, positional, names)
    given = {name: options.pop(name) for name in (
        "max_num_seqs", "block_size", "swap_space", "gpu_memory_utilization",
        "tensor_parallel_size", "pipeline_parallel_size", "trust_remote_code",
    )}  # fmt: skip
    given = {name: value for name, value in given.items() if value is not None}
    if "gpu_memory_utilization" in given:
        given["device"] = options.get("device", "cpu")
    try:
        translated = engine_options(given)
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    for field, value in translated.items():
        if field == "device":
            continue
        ours = f"--{field.replace('_', '-')}"
        if _typed(ctx, field) and options[field] != value:
            raise click.UsageError(f"{ours} and its vLLM spelling disagree; give one of them")
        options[field] = value
    quiet, loud = options.pop("disable_log_requests"), options.pop("enable_log_requests")
    if quiet and loud:
        raise click.UsageError("--disable-log-requests and --enable-log-requests disagree")
    return {
        "log_requests": not quiet,
        "log_stats": not options.pop("disable_log_stats"),
        "served_model_names": names,
        "chat_template": _template(options.pop("chat_template")),
        "uvicorn_log_level": options.pop("uvicorn_log_level"),
        "tokenizer_info": options.pop("enable_tokenizer_info_endpoint"),
    }


def _take_model(options: dict, positional: list[str], names: list[str]) -> None:
    """``vllm serve MODEL``: the first positional argument is the model; more of them are the
    rest of ``--served-model-name``'s list (``--served-model-name a b``)."""
    if not positional:
        return
    model, extra = positional[0], positional[1:]
    if extra and not names:
        raise click.UsageError(f"unexpected arguments {extra}: give one MODEL")
    names += extra
    if options.get("model") not in (None, model):
        raise click.UsageError(f"MODEL {model!r} and --model {options['model']!r} disagree")
    options["model"] = model


def _typed(ctx: click.Context, name: str) -> bool:
    """Was our flag for ``name`` given on the command line (not left at its default)?"""
    return ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE


def _template(value: str | None) -> str | None:
    """vLLM's ``--chat-template``: a file's contents when it names a file, else the template."""
    if value is None:
        return None
    path = Path(value).expanduser()
    try:
        return path.read_text() if path.is_file() else value
    except OSError as error:
        raise click.UsageError(f"cannot read --chat-template {value!r}: {error}") from error
