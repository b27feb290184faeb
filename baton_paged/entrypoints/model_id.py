"""The model id clients see in ``/v1/models`` and send as ``model``.

``--served-model-name`` when given. Otherwise never a filesystem path, which would show clients
how the server's disk is laid out: a local checkpoint is known by its directory's (or GGUF
file's) name, a hub id (``org/name``) as it is, the built-in model by its hub id
(``HuggingFaceTB/SmolLM2-135M-Instruct``, what a client written for vLLM serving it sends), with
its earlier id ``baton-paged-default`` still accepted.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_ALIAS = "baton-paged-default"
"""The built-in model's earlier id, which requests may still name."""


def served_model_names(model: str | None, served_model_names: list[str] | None = None) -> list[str]:
    """Every id requests may name the model by, the one replies carry first."""
    if served_model_names:
        return list(served_model_names)
    return [served_model_id(model)] + ([DEFAULT_ALIAS] if not model else [])


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
