"""Memory-pressure watermarks for the vLLM scheduler plugin, as plain Python.

The vLLM scheduler (``baton_paged.plugins.vllm_scheduler``) reads vLLM's KV-cache usage once per
step and asks a ``PressureGate`` two questions: shed a running request now, and may the batch
grow? The answers follow the engine's own ``MemoryMonitor`` rules:

* above the high watermark one running request is shed per step, down to a batch of one;
* from a high crossing until usage falls below the low watermark the batch does not grow;
* below the low watermark admission is open again.

This module imports nothing from vLLM, so its rules are tested in the main environment too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from baton_paged.sched.memory_monitor import Hysteresis, check_watermarks

CONFIG_KEY = "baton"
"""The key of vLLM's ``additional_config`` under which the plugin's settings live."""
POLICIES = ("vllm", "baton", "static")


@dataclass(frozen=True)
class PressureSettings:
    """The plugin's settings, named as in ``EngineConfig`` so one vocabulary serves both."""

    memory_high_watermark: float = 0.9
    """KV-cache usage (0..1) above which the batch sheds one request per step and stops growing."""
    memory_low_watermark: float = 0.7
    """Usage below which a held batch grows again; the gap is the hysteresis."""
    policy: str = "vllm"
    """How steps are formed: vllm (vLLM's own: new prompts' chunks mixed with the running
    decodes), baton (a step either prefills newly admitted requests alone or decodes the batch;
    admitted requests join the decode batch the step after their prefill), static (a batch runs
    to completion before anything joins; for ablation)."""
    metrics_port: int | None = None
    """Serve the plugin's Prometheus counters (and the process's default registry) on this port
    from the engine-core process; ``vllm serve``'s own /metrics cannot see that process."""

    def __post_init__(self) -> None:
        check_watermarks(self.memory_high_watermark, self.memory_low_watermark)
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        port = self.metrics_port
        if port is not None and (type(port) is not int or not 0 < port < 65536):
            raise ValueError(f"metrics_port must be a port number (1-65535), got {port!r}")

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> PressureSettings:
        """Read ``additional_config["baton"]``; defaults when absent, ValueError when malformed.

        Unknown keys are refused rather than ignored, so a misspelt watermark cannot silently
        leave the default in force.
        """
        section = _section(additional_config)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(
                f"unknown key(s) {unknown} in additional_config[{CONFIG_KEY!r}]; "
                f"known keys: {sorted(known)}"
            )
        return cls(**section)


def _section(additional_config: Any) -> Mapping[str, Any]:
    """The plugin's own part of ``additional_config`` (vLLM allows a dict or an object)."""
    if not isinstance(additional_config, Mapping):
        return {}
    section = additional_config.get(CONFIG_KEY, {})
    if not isinstance(section, Mapping):
        raise ValueError(
            f"additional_config[{CONFIG_KEY!r}] must be a mapping, got {type(section).__name__}"
        )
    return section


class PressureGate(Hysteresis):
    """The engine's watermark hysteresis, fed vLLM's KV-cache usage once per scheduler step."""

    def __init__(self, settings: PressureSettings | None = None):
        self.settings = settings or PressureSettings()
        super().__init__(self.settings.memory_high_watermark, self.settings.memory_low_watermark)

    def should_shed(self, num_running: int) -> bool:
        """Shed one request this step? Only above the high watermark, and never the last one."""
        return self.above_high and num_running > 1

    def slot_cap(self, num_running: int, max_slots: int, num_parked: int = 0) -> int:
        """How many slots may be in use after admission this step, counting ``num_parked``
        requests that hold a slot without running (vLLM's paused streaming sessions).

        While holding, the batch keeps its size: a slot opens only when a request leaves (or is
        preempted for a higher-priority one). An empty batch may always take one request, so a
        hold can never stall the engine, however many parked requests keep their memory.
        """
        if not self.holding:
            return max_slots
        return min(max(num_running, 1) + num_parked, max_slots)
