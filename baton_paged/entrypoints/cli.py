"""The ``baton-paged`` command. Subcommands import torch and transformers only when they run."""

from __future__ import annotations

import dataclasses

import click

from baton_paged.entrypoints.bench_cli import bench
from baton_paged.entrypoints.engine_flags import (
    build_engine,
    engine_options,
    limit_options,
    one_line,
)
from baton_paged.entrypoints.vllm_flags import take_vllm_flags, vllm_serve_options
from baton_paged.processing.tool_calls import PARSERS

ARCH_CHOICES = ("llama", "qwen2", "gpt2")
SIZE_CHOICES = ("tiny", "small", "smollm2", "llama1b")


@click.group()
@click.version_option(package_name="baton-paged")
def main() -> None:
    """baton-paged: BATON dynamic re-batching on a paged KV cache."""


@main.command("make-model")
@click.argument("out_dir", type=click.Path(file_okay=False, writable=True))
@click.option(
    "--arch",
    type=click.Choice(ARCH_CHOICES),
    default="llama",
    show_default=True,
    help="HF architecture of the checkpoint.",
)
@click.option(
    "--size",
    type=click.Choice(SIZE_CHOICES),
    default="small",
    show_default=True,
    help="tiny: 2 layers for tests; small: ~28M parameters (Llama: hidden 512, 8 layers, "
    "8 heads, 4 KV heads, vocab 4096); smollm2: SmolLM2-135M-Instruct's exact shape (30 layers, "
    "hidden 576, 9 heads, 3 KV heads, vocab 49152, tied embeddings); llama1b: Llama-3.2-1B's "
    "shape (1.24B parameters: hidden 2048, 16 layers, 32 heads, 8 KV heads, vocab 128256, tied "
    "embeddings, rope theta 500000), stored as bfloat16 (2.5 GB).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
def make_model(out_dir: str, arch: str, size: str, seed: int) -> None:
    """Write a random-weight HF checkpoint with a locally trained byte-level BPE tokenizer.

    Nothing is downloaded; the same arguments give the same files. The weights are random, so the
    model's text is noise: it exists to exercise and measure the engine.
    """
    from baton_paged.model.builder import build_model

    try:
        path = build_model(out_dir, arch=arch, size=size, seed=seed)
    except OSError as error:  # no room, no permission, a file in the way
        raise click.UsageError(f"cannot write {out_dir}: {one_line(error)}") from error
    click.echo(f"wrote a random-weight {arch} ({size}) checkpoint to {path}")


API_KEY_ENV = "BATON_PAGED_API_KEY"


@main.command()
@engine_options
@limit_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=int, default=8000, show_default=True, help="Port to listen on.")
@click.option(
    "--api-key",
    envvar=API_KEY_ENV,
    default=None,
    help=f"Require 'Authorization: Bearer KEY' on /v1 routes (or set {API_KEY_ENV}).",
)
@click.option(
    "--served-model-name",
    multiple=True,
    help="Model id clients send (default: the checkpoint's directory or file name, never its "
    "path; a hub id as given; the built-in model's hub id, with baton-paged-default also "
    "accepted). Several names, as "
    "in vLLM (--served-model-name a b): replies carry the first, requests may use any.",
)
@click.option(
    "--max-waiting",
    type=int,
    default=1024,
    show_default=True,
    help="Most requests waiting for a batch slot; more get HTTP 503.",
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds the first Ctrl-C or SIGTERM gives requests in flight to finish (a second one "
    "stops at once).",
)
@click.option(
    "--enable-auto-tool-choice",
    is_flag=True,
    help='Let requests use tool_choice "auto" (the default with tools): the model decides '
    "whether to call, and --tool-call-parser reads its calls (vLLM's flags).",
)
@click.option(
    "--tool-call-parser",
    type=click.Choice(sorted(PARSERS)),
    default=None,
    help="How the model writes tool calls: hermes (<tool_call>{json}</tool_call>: Hermes, "
    "Qwen2.5, SmolLM2) or llama3_json (Llama 3.1+).",
)
@click.option(
    "--replicas",
    type=click.IntRange(min=1),
    default=None,
    help="Serve N engine replicas on Ray Serve (pip install 'baton-paged[ray]'): a local Ray "
    "instance, or the cluster this machine joined with `ray start`.",
)
@vllm_serve_options
@click.pass_context
def serve(
    ctx,
    host,
    port,
    api_key,
    max_waiting,
    drain_timeout,
    enable_auto_tool_choice,
    tool_call_parser,
    replicas,
    **options,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions,
    /v1/models, /health), streaming included. MODEL, vLLM's positional form, is --model."""
    check_api_key(api_key)
    limits = server_limits(options)
    server_options = take_vllm_flags(options, ctx)
    names = server_options["served_model_names"]
    tool_parser = auto_tool_parser(enable_auto_tool_choice, tool_call_parser)
    if replicas is not None:
        if server_options["chat_template"] or server_options["tokenizer_info"]:
            raise click.UsageError(
                "--replicas serves the tokenizer's chat template, without /tokenizer_info"
            )
        ray_options = {"api_key": api_key, "max_waiting": max_waiting, "limits": limits}
        ray_options["tool_parser"] = tool_parser
        serve_on_ray(host, port, replicas, names, options, **ray_options)
        return
    import uvicorn

    from baton_paged.entrypoints.async_engine import AsyncEngine
    from baton_paged.entrypoints.model_id import served_model_names
    from baton_paged.entrypoints.server import build_app
    from baton_paged.entrypoints.server.connection import serving_config
    from baton_paged.entrypoints.server.logs import STATS_INTERVAL, show_server_logs

    engine = AsyncEngine(build_engine(options), max_waiting=max_waiting, own_thread=False)
    name, *aliases = served_model_names(options["model"], names)
    app = build_app(
        engine,
        name,
        api_key,
        limits,
        tool_parser,
        aliases=aliases,
        chat_template=server_options["chat_template"],
        tokenizer_info=server_options["tokenizer_info"],
        log_requests=server_options["log_requests"],
        stats_interval=STATS_INTERVAL if server_options["log_stats"] else None,
    )
    log_level = server_options["uvicorn_log_level"]
    show_server_logs()
    server = uvicorn.Server(serving_config(app, host, port, limits, drain_timeout, log_level))
    run_engine_on_main_thread(engine, server, drain_timeout)
    if not server.started:
        raise SystemExit(1)  # uvicorn has logged why (a port in use, say)


def auto_tool_parser(enabled: bool, parser: str | None) -> str | None:
    """The parser of tool_choice "auto" replies, or None when "auto" is off; one flag without
    the other is an error, as in vLLM."""
    if enabled and parser is None:
        raise click.UsageError("--enable-auto-tool-choice needs --tool-call-parser")
    if parser is not None and not enabled:
        raise click.UsageError("--tool-call-parser takes effect with --enable-auto-tool-choice")
    return parser


def check_api_key(api_key: str | None) -> None:
    """An empty key (``--api-key ""``, or the variable set but empty) is a mistake, not a wish
    to serve without one: refuse to start rather than turn authentication off."""
    import os

    empty_env = api_key is None and os.environ.get(API_KEY_ENV) is not None
    if empty_env or (api_key is not None and not api_key.strip()):
        raise click.UsageError(
            f"the API key is empty (--api-key or {API_KEY_ENV}): give a key, or unset both to "
            "serve without authentication"
        )


def server_limits(options: dict):
    """Take the ServerLimits flags out of ``options`` (the rest are EngineConfig's)."""
    from baton_paged.entrypoints.server.limits import ServerLimits

    names = [field.name for field in dataclasses.fields(ServerLimits)]
    values = {name: options.pop(name) for name in names}
    try:
        return ServerLimits(**values)
    except ValueError as error:
        raise click.UsageError(str(error)) from error


def serve_on_ray(
    host, port, replicas, served_model_names, options, *, api_key, max_waiting, limits, tool_parser
) -> None:
    """The same routes from ``replicas`` engines behind Ray Serve's proxy, until Ctrl-C."""
    from baton_paged.config import EngineConfig
    from baton_paged.registries import check_registered

    try:
        check_registered(EngineConfig(**options))  # a bad option fails here, not in every replica
        import ray
        from ray import serve

        from baton_paged.plugins.ray_serve import baton_application
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    except ImportError as error:
        hint = "--replicas needs Ray Serve: pip install 'baton-paged[ray]'"
        raise click.UsageError(f"{hint} ({error})") from error
    import signal

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as on Ctrl-C, then clean up
    ray.init()  # joins the cluster this machine is part of, or starts a local one
    serve.start(http_options={"host": host, "port": port})
    app = baton_application(
        options,
        served_model_name=served_model_names,
        api_key=api_key,
        max_waiting=max_waiting,
        replicas=replicas,
        limits=limits,
        tool_parser=tool_parser,
    )
    try:
        serve.run(app, name="baton-paged", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()  # stops the local instance ray.init started, with its agents


def run_engine_on_main_thread(engine, server, drain_timeout: float) -> None:
    """The step loop on the main thread, uvicorn on a background one (see AsyncEngine for why the
    loop wants the thread that loaded the model).

    The first Ctrl-C or SIGTERM stops uvicorn taking connections and the engine taking requests
    while the loop keeps stepping, so requests in flight finish; those still open after
    ``drain_timeout`` fail with a 503 (a stream: an error event, then ``[DONE]``), which uvicorn
    has a few seconds more to send before it cuts connections. Once uvicorn is done the loop
    stops. A second signal stops both at once. The handler only sets flags, so a signal never
    lands in the middle of an iteration and never waits on a lock the interrupted main thread
    may hold.
    """
    import signal
    import threading

    def serve_http() -> None:
        try:
            server.run()
        finally:
            engine.shutdown()  # the server is gone, whether drained, stopped or failed to bind

    def on_signal(signum, frame) -> None:
        if server.should_exit:  # the second signal: stop now
            server.force_exit = True
            engine.stop_soon()
            return
        server.should_exit = True
        engine.drain(drain_timeout)

    http = threading.Thread(target=serve_http, name="baton-http")
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    http.start()
    try:
        engine.run_loop()
    finally:
        server.should_exit = True
        http.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@main.command("plugins")
def list_plugins() -> None:
    """List the plugins installed in the baton_paged.plugins entry-point group and whether each
    loaded (BATON_PAGED_PLUGINS=a,b loads only those named)."""
    from baton_paged.plugins.registry import GROUP, load_plugins

    statuses = load_plugins()
    if not statuses:
        click.echo(f"no plugins installed in the {GROUP!r} entry-point group")
    for status in statuses.values():
        state = "loaded" if status.error is None else f"failed: {status.error}"
        click.echo(f"{status.name}  {status.target}  {state}")


@main.command()
@click.argument("prompt")
@click.option("--max-tokens", type=int, default=32, show_default=True, help="Tokens to generate.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@engine_options
def generate(prompt, max_tokens, temperature, **options) -> None:
    """Generate a completion of PROMPT once and print it."""
    from baton_paged.entrypoints.llm import LLM
    from baton_paged.sampling_params import SamplingParams

    engine = build_engine(options)
    llm = LLM.from_engine(engine)
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens)
    click.echo(llm.generate([prompt], params)[0].outputs[0].text)


main.add_command(bench)

if __name__ == "__main__":
    main()
