"""The ``baton_paged.plugins`` entry-point group: an installed plugin's policy becomes a valid
``policy`` everywhere, a broken plugin is reported without taking anything down, and
``BATON_PAGED_PLUGINS`` chooses which load."""

from __future__ import annotations

import sys
import textwrap

import pytest
from click.testing import CliRunner

from baton_paged import LLM, SamplingParams
from baton_paged.attention.registry import BACKENDS, backend_class, register_backend
from baton_paged.attention.torch_backend import TorchBackend
from baton_paged.config import EngineConfig
from baton_paged.entrypoints import cli
from baton_paged.plugins import registry
from baton_paged.registries import check_registered
from baton_paged.sched.policies import POLICIES, BatonPolicy, register_policy

PLUGIN_MODULE = '''
from baton_paged.sched.policies import BatonPolicy, register_policy


class EchoPolicy(BatonPolicy):
    """BATON under another name: proves the plugin's class is what runs."""

    name = "echo_baton"
    plans = 0

    def form(self, step):
        EchoPolicy.plans += 1
        return super().form(step)


def register():
    register_policy(EchoPolicy)


def broken():
    raise RuntimeError("this plugin is broken")
'''


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """A distribution on sys.path declaring two plugins, one that works and one that raises."""
    (tmp_path / "echo_plugin.py").write_text(PLUGIN_MODULE)
    dist = tmp_path / "echo_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        textwrap.dedent(
            """\
            [baton_paged.plugins]
            echo = echo_plugin:register
            broken = echo_plugin:broken
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_loaded", None)
    monkeypatch.delenv(registry.ALLOW_LIST_ENV, raising=False)
    yield
    POLICIES.pop("echo_baton", None)
    sys.modules.pop("echo_plugin", None)
    registry._loaded = None


def test_a_plugin_policy_serves_like_the_policy_it_extends(installed, tiny_model_dir):
    statuses = registry.load_plugins()
    assert statuses["echo"].error is None and "echo_baton" in POLICIES
    path = str(tiny_model_dir("llama"))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = ["def main():", "x"]
    echo = LLM(path, policy="echo_baton", dtype="float64").generate(prompts, params)
    baton = LLM(path, policy="baton", dtype="float64").generate(prompts, params)
    assert [o.outputs[0].token_ids for o in echo] == [o.outputs[0].token_ids for o in baton]
    assert sys.modules["echo_plugin"].EchoPolicy.plans > 0


def test_a_broken_plugin_is_reported_and_skipped(installed, caplog):
    statuses = registry.load_plugins()
    assert statuses["broken"].error == "RuntimeError: this plugin is broken"
    assert "failed to load" in caplog.text
    check_registered(EngineConfig(policy="echo_baton"))  # the other one still loaded


def test_plugins_load_once_per_process(installed):
    assert registry.load_plugins() is registry.load_plugins()


def test_the_allow_list_chooses_which_plugins_load(installed, monkeypatch):
    monkeypatch.setenv(registry.ALLOW_LIST_ENV, "broken")
    assert list(registry.load_plugins()) == ["broken"]
    with pytest.raises(ValueError, match="unknown policy 'echo_baton'"):
        check_registered(EngineConfig(policy="echo_baton"))


def test_an_empty_allow_list_loads_none(installed, monkeypatch):
    monkeypatch.setenv(registry.ALLOW_LIST_ENV, "")
    assert registry.load_plugins() == {}


def test_the_cli_lists_plugins_and_their_state(installed):
    result = CliRunner().invoke(cli.main, ["plugins"])
    assert result.exit_code == 0, result.output
    assert "echo  echo_plugin:register  loaded" in result.output
    failed = "broken  echo_plugin:broken  failed: RuntimeError: this plugin is broken"
    assert failed in result.output


def test_register_policy_refuses_what_would_be_ambiguous():
    class Impostor(BatonPolicy):
        name = "baton"

    class Nameless(BatonPolicy):
        name = ""

    with pytest.raises(ValueError, match="taken by BatonPolicy"):
        register_policy(Impostor)
    with pytest.raises(ValueError, match="non-empty str"):
        register_policy(Nameless)
    with pytest.raises(TypeError, match="Policy subclass"):
        register_policy(object)
    register_policy(BatonPolicy)  # the same class again changes nothing
    assert POLICIES["baton"] is BatonPolicy


def test_register_backend_adds_a_named_backend():
    target = "baton_paged.attention.torch_backend:TorchBackend"
    try:
        register_backend("torch_again", target)
        assert backend_class("torch_again") is TorchBackend
        check_registered(EngineConfig(attention_backend="torch_again"))
        with pytest.raises(ValueError, match="taken by"):
            register_backend("torch", target.replace("TorchBackend", "Other"))
        with pytest.raises(ValueError, match="'module:Class'"):
            register_backend("bad", "no_colon")
    finally:
        BACKENDS.pop("torch_again", None)
