"""Random-weight HF checkpoints with a locally trained tokenizer: models without downloads."""

from baton_paged.model_builder.build import MARKER_FILE, build_model, read_marker
from baton_paged.model_builder.cache import cache_root, cached_model
from baton_paged.model_builder.configs import ARCHS, SIZES, model_config

__all__ = [
    "ARCHS",
    "MARKER_FILE",
    "SIZES",
    "build_model",
    "cache_root",
    "cached_model",
    "model_config",
    "read_marker",
]
