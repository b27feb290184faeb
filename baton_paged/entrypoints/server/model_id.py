"""The model id clients see in ``/v1/models`` and send as ``model``.

``--served-model-name`` when given. Otherwise never a filesystem path, which would show clients
how the server's disk is laid out: a local checkpoint is known by its directory's (or GGUF
file's) name, a hub id (``org/name``) as it is, the built-in model as ``baton-paged-default``.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_ID = "baton-paged-default"


def served_model_id(model: str | None, served_model_name: str | None = None) -> str:
    if served_model_name:
        return served_model_name
    if not model:
        return DEFAULT_MODEL_ID
    path = Path(model).expanduser()
    if path.is_file():
        return path.stem
    if path.is_dir():
        return path.resolve().name
    return model
