"""Third-party extensions, discovered through the ``baton_paged.plugins`` entry-point group.

A package adds a scheduling policy or an attention backend without touching baton-paged by
declaring, in its own ``setup.cfg``::

    [options.entry_points]
    baton_paged.plugins =
        my_policy = my_package.baton:register

Each entry point names a zero-argument callable. Every process calls each plugin once, before
the first engine is built, so ``--policy my_policy`` works on the command line, in
``LLM(...)`` and in every Ray Serve replica alike. ``register`` calls ``register_policy``
(``baton_paged.sched.policies``) and/or ``register_backend`` (``baton_paged.attention.registry``),
and must be safe to call again. ``BATON_PAGED_PLUGINS=a,b``
loads only the plugins named; an empty value loads none. A plugin that fails to load is logged
and skipped: it must not take the server down, and asking for what it would have added then
fails with the usual "unknown policy" error.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

logger = logging.getLogger(__name__)

GROUP = "baton_paged.plugins"
ALLOW_LIST_ENV = "BATON_PAGED_PLUGINS"


@dataclass(frozen=True)
class PluginStatus:
    name: str
    target: str
    """The entry point's ``module:callable``."""
    error: str | None
    """Why it failed to load; None when it loaded."""


_loaded: dict[str, PluginStatus] | None = None


def load_plugins() -> dict[str, PluginStatus]:
    """Load every allowed plugin the first time; later calls return the same statuses."""
    global _loaded
    if _loaded is None:
        _loaded = {ep.name: _load(ep) for ep in allowed(entry_points(group=GROUP))}
    return _loaded


def allowed(found) -> list[EntryPoint]:
    """The entry points ``BATON_PAGED_PLUGINS`` lets through (all of them when it is unset)."""
    names = os.environ.get(ALLOW_LIST_ENV)
    if names is None:
        return list(found)
    wanted = {name.strip() for name in names.split(",") if name.strip()}
    return [ep for ep in found if ep.name in wanted]


def _load(entry_point: EntryPoint) -> PluginStatus:
    try:
        entry_point.load()()
    except Exception as error:  # a broken plugin is reported, never fatal
        logger.exception("baton-paged plugin %r (%s) failed to load", *_describe(entry_point))
        return PluginStatus(entry_point.name, entry_point.value, f"{type(error).__name__}: {error}")
    logger.info("loaded baton-paged plugin %r (%s)", *_describe(entry_point))
    return PluginStatus(entry_point.name, entry_point.value, None)


def _describe(entry_point: EntryPoint) -> tuple[str, str]:
    return entry_point.name, entry_point.value
