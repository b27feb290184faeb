"""The engine's command-line flags: one per ``EngineConfig`` field (and per ``ServerLimits``
field for the server), and the engine built from them with one ``Error:`` line for anything that
cannot work. ``serve``, ``generate`` and ``bench`` share them."""

from __future__ import annotations

import click


def engine_options(fn):
    """One ``--flag`` per EngineConfig field, its help text the field's docstring."""
    from baton_paged.entrypoints.config_fields import config_fields

    return dataclass_options(fn, config_fields())


def limit_options(fn):
    """One ``--flag`` per ServerLimits field (what one request may ask of the server)."""
    from baton_paged.entrypoints.config_fields import LIMITS_SOURCE, config_fields

    return dataclass_options(fn, config_fields("ServerLimits", LIMITS_SOURCE))


SHORT_FLAGS = {"quantization": "-q"}
"""vLLM's one-letter spellings of our fields' flags."""


def dataclass_options(fn, fields: dict):
    """``fn`` with a click option per field (``config_fields``' records), in field order."""
    for field in reversed(list(fields.values())):
        flag = f"--{field.name.replace('_', '-')}"
        if field.type is bool:
            flag = f"{flag}/--no-{field.name.replace('_', '-')}"
        short = [SHORT_FLAGS[field.name]] if field.name in SHORT_FLAGS else []
        option = click.option(
            flag,
            *short,
            field.name,
            type=field.type,
            default=field.default,
            show_default=field.default is not None,
            help=field.doc,
        )
        fn = option(fn)
    return fn


def build_engine(options: dict):
    """An Engine from CLI options. A bad value, a model that cannot be loaded, a device or
    backend that cannot run, a KV budget too small: each is one ``Error:`` line (exit 2) saying
    what to change, not a traceback."""
    from baton_paged.attention.base import BackendUnavailableError
    from baton_paged.config import EngineConfig
    from baton_paged.engine import Engine
    from baton_paged.model.builder import ModelUnavailableError
    from baton_paged.registries import check_registered

    try:
        config = EngineConfig(**options)
        check_registered(config)
        check_device(config.device)
        check_model_path(config.model)
        return Engine(config)
    except ModelUnavailableError as error:  # the default model cannot be fetched: say what to do
        raise click.ClickException(str(error)) from error
    except (ValueError, BackendUnavailableError) as error:
        raise click.UsageError(one_line(error)) from error
    except OSError as error:  # transformers' word for a checkpoint it cannot find or read
        hint = "pass a checkpoint directory, or a hub id this machine can download"
        reason = one_line(error).rstrip(".")
        raise click.UsageError(
            f"cannot load --model {options['model']!r}: {reason}; {hint}"
        ) from error


def check_device(device: str) -> None:
    import torch

    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        reason = "CUDA is not available in this torch build/machine"
        raise ValueError(f"--device {device}: {reason}; use --device cpu")


def check_model_path(model: str | None) -> None:
    """A ``--model`` that is clearly a path (absolute, ./, ../, ~, or deeper than a hub's
    ``org/name``) must be a directory or a GGUF file; else transformers reads it as a hub id and
    says so."""
    import os

    if model is None:
        return
    path = os.path.expanduser(model)
    if os.path.isabs(path) or model.startswith((".", "~")) or model.count("/") > 1:
        if not os.path.isdir(path) and not (path.endswith(".gguf") and os.path.isfile(path)):
            what = "not a directory" if os.path.exists(path) else "no such directory"
            raise ValueError(
                f"--model {model}: {what} (give a checkpoint directory, a .gguf file or a hub id)"
            )


def one_line(error: Exception) -> str:
    return " ".join(str(error).split())
