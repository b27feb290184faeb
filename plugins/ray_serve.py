"""Scale-out on Ray Serve: one BATON engine per replica, the same OpenAI routes as one server.

    pip install 'baton-paged[ray]'
    baton-paged serve --replicas 2                    # a local Ray instance, or the cluster
                                                      # this machine joined with `ray start`
    serve run baton_paged.plugins.ray_serve:app_builder model=DIR replicas=2

Each replica is a Ray actor that builds its own ``AsyncEngine`` and serves ``build_app``'s routes
through Serve's HTTP proxy (``@serve.ingress`` with the app built on the replica, after the
engine, by ``__serve_build_asgi_app__``). Serve's router spreads requests over the replicas;
inside a replica BATON batches them. ``max_ongoing_requests`` is raised from Serve's default of
5 so a replica receives enough requests to fill its batch and queue behind it. Every response
names the replica that served it in ``x-baton-replica``.

Limits: every node must be able to load the model from the same path or hub id (the built-in
default model is built deterministically on each node on first use); a request lives on one
replica, so there is no preemption or KV movement across replicas; streams survive a replica
only as long as that replica does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ray import serve
from ray.serve import Application

from baton_paged.engine import Engine
from baton_paged.entrypoints.async_engine import AsyncEngine
from baton_paged.entrypoints.model_id import served_model_names
from baton_paged.entrypoints.server import build_app
from baton_paged.entrypoints.server.limits import ServerLimits

REPLICA_HEADER = "x-baton-replica"


@serve.ingress()
class BatonReplica:
    """One engine and its routes; Serve makes ``replicas`` of these."""

    def __init__(
        self,
        engine_options: dict,
        model_names: list[str],
        api_key: str | None,
        waiting: int,
        limits: ServerLimits | None = None,
        tool_parser: str | None = None,
    ):
        self.engine = AsyncEngine(Engine.build(**engine_options), max_waiting=waiting)
        self.model_names = model_names
        """The id replies carry, then the others requests may use."""
        self.api_key = api_key
        self.limits = limits
        self.tool_parser = tool_parser

    def __serve_build_asgi_app__(self):
        name, *aliases = self.model_names
        app = build_app(
            self.engine, name, self.api_key, self.limits, self.tool_parser, aliases=aliases
        )
        replica = serve.get_replica_context().replica_tag

        @app.middleware("http")
        async def name_the_replica(request, call_next):
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = replica
            return response

        return app

    def check_health(self) -> None:
        """Serve restarts a replica whose step loop has died."""
        if not self.engine.is_running:
            raise RuntimeError("the engine's step loop is not running")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)  # absent when __init__ failed
        if engine is not None:
            engine.close()


def baton_application(
    engine_options: dict,
    *,
    served_model_name: str | Sequence[str] | None = None,
    api_key: str | None = None,
    max_waiting: int = 1024,
    replicas: int | None = 1,
    autoscaling: dict | None = None,
    max_ongoing_requests: int | None = None,
    ray_actor_options: dict | None = None,
    limits: ServerLimits | None = None,
    tool_parser: str | None = None,
) -> Application:
    """The Serve application: ``replicas`` engines built from ``engine_options`` (``EngineConfig``
    fields), or Serve autoscaling (``autoscaling``: an ``AutoscalingConfig`` dict) when given.
    A replica takes one GPU when the engine runs on CUDA, else one CPU. ``tool_parser``: how
    tool_choice "auto" replies are read (``build_app``)."""
    if autoscaling is None and (replicas is None or replicas < 1):
        raise ValueError(f"replicas must be a positive int, got {replicas!r}")
    device = str(engine_options.get("device", "cpu"))
    batch = int(engine_options.get("max_batch_size", 0) or 0) or 32
    deployment = serve.deployment(
        BatonReplica,
        name="baton-paged",
        num_replicas="auto" if autoscaling is not None else replicas,
        autoscaling_config=autoscaling,
        max_ongoing_requests=max_ongoing_requests or 2 * batch,
        max_queued_requests=max_waiting,
        ray_actor_options=ray_actor_options or default_actor_options(device),
        health_check_period_s=10,
    )
    given = [served_model_name] if isinstance(served_model_name, str) else served_model_name
    names = served_model_names(engine_options.get("model"), given)
    return deployment.bind(engine_options, names, api_key, max_waiting, limits, tool_parser)


def default_actor_options(device: str) -> dict:
    return {"num_gpus": 1, "num_cpus": 1} if device.startswith("cuda") else {"num_cpus": 1}


def app_builder(args: dict[str, Any]) -> Application:
    """``serve run baton_paged.plugins.ray_serve:app_builder key=value ...``: keys are
    ``EngineConfig`` fields plus ``replicas``, ``served_model_name``, ``api_key`` and
    ``max_waiting``; values arrive as strings and are converted by the field types."""
    engine_options, extra = parse_builder_args(args)
    return baton_application(engine_options, **extra)


def parse_builder_args(args: dict[str, Any]) -> tuple[dict, dict]:
    """``(engine options, baton_application keywords)`` from ``serve run``'s string arguments."""
    from baton_paged.entrypoints.config_fields import config_fields

    fields = config_fields()
    options = dict(args)
    extra = {
        "replicas": int(options.pop("replicas", 1)),
        "served_model_name": options.pop("served_model_name", None),
        "api_key": options.pop("api_key", None),
        "max_waiting": int(options.pop("max_waiting", 1024)),
    }
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"unknown options {unknown}; use EngineConfig fields or {sorted(extra)}")
    return {key: _convert(fields[key].type, value) for key, value in options.items()}, extra


def _convert(kind: type, value: Any) -> Any:
    if kind is bool and isinstance(value, str):
        return value.lower() in ("1", "true", "yes", "on")
    return kind(value)
