"""The vLLM plugin's watermark rules, as plain Python: these run without vLLM installed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from baton_paged.plugins.vllm_pressure import PressureGate, PressureSettings


def test_defaults_are_0_9_and_0_7():
    settings = PressureSettings()
    assert (settings.memory_high_watermark, settings.memory_low_watermark) == (0.9, 0.7)


@pytest.mark.parametrize("additional_config", [None, {}, {"other_plugin": {"x": 1}}, object()])
def test_settings_default_when_vllm_config_has_no_baton_section(additional_config):
    assert PressureSettings.from_additional_config(additional_config) == PressureSettings()


def test_settings_read_the_baton_section():
    config = {"baton": {"memory_high_watermark": 0.95, "memory_low_watermark": 0.5}}
    settings = PressureSettings.from_additional_config(config)
    assert (settings.memory_high_watermark, settings.memory_low_watermark) == (0.95, 0.5)


@pytest.mark.parametrize(
    "section",
    [
        {"memory_high_watermark": 0.7, "memory_low_watermark": 0.7},
        {"memory_high_watermark": 0.6},  # below the default low watermark
        {"memory_high_watermark": 1.01},
        {"memory_low_watermark": 0.0},
        {"memory_low_watermark": -0.1},
        {"memory_high_watermark": "0.9"},
        {"memory_high_watermark": True},
    ],
)
def test_bad_watermarks_raise_a_clear_value_error(section):
    with pytest.raises(ValueError, match=r"0 < low < high <= 1"):
        PressureSettings.from_additional_config({"baton": section})


def test_unknown_keys_and_a_non_mapping_section_are_refused():
    with pytest.raises(ValueError, match="unknown key.*'memory_high'"):
        PressureSettings.from_additional_config({"baton": {"memory_high": 0.9}})
    with pytest.raises(ValueError, match="must be a mapping"):
        PressureSettings.from_additional_config({"baton": 0.9})


def test_the_policy_defaults_to_vllms_own_and_is_checked():
    assert PressureSettings.from_additional_config({}).policy == "vllm"
    for policy in ("vllm", "baton", "static"):
        assert (
            PressureSettings.from_additional_config({"baton": {"policy": policy}}).policy == policy
        )
    with pytest.raises(ValueError, match="unknown policy 'chunked'; choose one of vllm, baton"):
        PressureSettings.from_additional_config({"baton": {"policy": "chunked"}})


def gate(high=0.9, low=0.7) -> PressureGate:
    return PressureGate(PressureSettings(high, low))


def test_the_gate_holds_from_a_high_crossing_until_below_the_low_watermark():
    g = gate()
    holding = []
    for usage in (0.5, 0.9, 0.91, 0.95, 0.8, 0.7, 0.69, 0.85, 0.91):
        g.observe(usage)
        holding.append(g.holding)
    # 0.9 is not above the high watermark, 0.7 not below the low one: both are strict
    assert holding == [False, False, True, True, True, True, False, False, True]
    assert (g.high_crossings, g.low_crossings) == (2, 1)


def test_shedding_needs_usage_above_high_and_more_than_one_running():
    g = gate()
    g.observe(0.95)
    assert g.should_shed(2) and not g.should_shed(1)
    g.observe(0.8)  # still holding, but no longer above high: hold without shedding
    assert g.holding and not g.should_shed(5)


def test_a_held_batch_keeps_its_size_and_an_empty_one_takes_one_request():
    g = gate()
    assert g.slot_cap(num_running=3, max_slots=8) == 8
    g.observe(0.99)
    assert g.slot_cap(num_running=3, max_slots=8) == 3
    assert g.slot_cap(num_running=0, max_slots=8) == 1
    assert g.slot_cap(num_running=9, max_slots=8) == 8
    g.observe(0.1)
    assert g.slot_cap(num_running=3, max_slots=8) == 8


def test_parked_requests_hold_slots_but_never_block_an_empty_batch():
    g = gate()
    g.observe(0.99)
    assert g.slot_cap(num_running=3, max_slots=8, num_parked=2) == 5
    assert g.slot_cap(num_running=0, max_slots=8, num_parked=2) == 3
    assert g.slot_cap(num_running=5, max_slots=8, num_parked=4) == 8


def test_the_watermark_module_does_not_import_vllm(tmp_path):
    code = (
        "import sys, baton_paged.plugins.vllm_pressure;"
        "print(any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "False"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_without_vllm_the_scheduler_module_names_what_is_missing():
    with pytest.raises(ModuleNotFoundError, match="vllm"):
        import baton_paged.plugins.vllm_scheduler  # noqa: F401
