"""Names plugins can extend, checked where an engine is built.

``EngineConfig`` checks only what its own fields can know; whether ``policy`` and
``attention_backend`` name something registered depends on the plugins this process loaded, so
the engine (and the CLI, to turn a bad name into a usage error) asks here, before any model loads.
"""

from __future__ import annotations

from baton_paged.attention.registry import AUTO, BACKENDS
from baton_paged.config import EngineConfig, check_choice
from baton_paged.plugins.registry import load_plugins
from baton_paged.sched.policies import POLICIES


def check_registered(config: EngineConfig) -> None:
    """ValueError naming the choices if ``config`` asks for a policy or attention backend that
    neither baton-paged nor a loaded plugin registered."""
    load_plugins()  # plugins may add policies and attention backends to the choices
    check_choice("policy", config.policy, POLICIES)
    check_choice("attention_backend", config.attention_backend, (AUTO, *BACKENDS))
