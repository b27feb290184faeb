"""Shared fixtures: tiny random-weight checkpoints, and a clean skip of `gpu` tests without CUDA."""

from __future__ import annotations

import gc

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module", autouse=True)
def _collect_engines_after_each_module():
    """An engine's parts refer to each other, so its KV cache and host swap pool (1 GiB each
    by default) are freed by a garbage collection, not when the test drops it; the suite
    once grew past the machine's 24 GiB between two of Python's own collections."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """Build each tiny checkpoint once per session: ``tiny_model_dir("llama")`` is its path."""
    from baton_paged.model.builder import build_model

    built = {}

    def get(arch: str = "llama"):
        if arch not in built:
            built[arch] = build_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, "tiny")
        return built[arch]

    return get
