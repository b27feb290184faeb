"""The `baton-paged` command line."""

from click.testing import CliRunner
from transformers import AutoConfig

from baton_paged import cli
from baton_paged.model_builder import ARCHS, SIZES


def test_make_model_writes_a_loadable_checkpoint(tmp_path):
    result = CliRunner().invoke(
        cli.main, ["make-model", str(tmp_path / "m"), "--arch", "gpt2", "--size", "tiny"]
    )
    assert result.exit_code == 0, result.output
    assert "random-weight gpt2 (tiny)" in result.output
    assert AutoConfig.from_pretrained(tmp_path / "m").model_type == "gpt2"


def test_make_model_rejects_unknown_arch(tmp_path):
    result = CliRunner().invoke(cli.main, ["make-model", str(tmp_path / "m"), "--arch", "mamba"])
    assert result.exit_code == 2 and "'mamba' is not one of" in result.output
    assert not (tmp_path / "m").exists()


def test_cli_choices_match_the_builder():
    # The CLI keeps its own copy so `--help` needs no torch import; this keeps the two in step.
    assert cli.ARCH_CHOICES == ARCHS and cli.SIZE_CHOICES == tuple(SIZES)


def test_version():
    result = CliRunner().invoke(cli.main, ["--version"])
    assert result.exit_code == 0 and "0.1.0" in result.output
