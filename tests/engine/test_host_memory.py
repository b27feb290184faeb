"""A CPU engine's large activations reuse freed heap memory instead of being faulted in afresh.

Each case runs in a fresh interpreter: the malloc setting is the process's, and this test process
has it already once any CPU engine was built."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from baton_paged.host_memory import OPT_OUT_ENV

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the setting is glibc's malloc's",
)

PROBE = """
import json, resource, torch
from baton_paged.host_memory import keep_freed_memory
from baton_paged.model.packed_linear import PackedLinear
torch.set_num_threads(1)
kept = keep_freed_memory() if {configure} else None
torch.manual_seed(0)
shapes = [(1024, 512), (2816, 512), (512, 1408)]  # the small Llama's
qkv, gate_up, down = (PackedLinear(torch.randn(shape)) for shape in shapes)
def forward(rows):  # a prefill forward's large activations, at its row count
    hidden = torch.randn(rows, 512)
    for _ in range(2):
        hidden = hidden + qkv(hidden)[:, :512]
        both = gate_up(hidden)
        hidden = hidden + down(both[:, :1408] * both[:, 1408:])
def run(counted):
    forward(2048)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for rows in torch.randint(256, 4096, (20,)).tolist():
        forward(rows)
    counted.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
counted = []
if {in_thread}:  # as AsyncEngine steps: on a thread of its own
    import threading
    thread = threading.Thread(target=run, args=(counted,))
    thread.start()
    thread.join()
else:
    run(counted)
print(json.dumps({{"kept": kept, "faults": counted[0]}}))
"""


def probes(*runs: dict) -> list[dict]:
    """Each run's probe (``probe_process``'s keywords) in a fresh interpreter, side by side: a
    probe counts its own process's faults, and each runs on one thread."""
    started = [probe_process(**run) for run in runs]
    results = []
    for process in started:
        out, err = process.communicate()
        assert process.returncode == 0, err[-3000:]
        results.append(json.loads(out.splitlines()[-1]))
    return results


def probe_process(
    configure: bool, env: dict[str, str] | None = None, in_thread: bool = False
) -> subprocess.Popen:
    code = PROBE.format(configure=configure, in_thread=in_thread)
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=os.environ | (env or {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("in_thread", [False, True], ids=["main thread", "engine thread"])
def test_prefill_forwards_fault_far_less_once_freed_memory_is_kept(in_thread):
    """Forwards at varied row counts, as prefills come: glibc's default faults every large block
    in afresh; kept, most blocks land in memory an earlier forward freed (this probe: 8.2-9.4x
    fewer faults measured here with float32 in column blocks, 3.0-3.4x with oneDNN's padded
    copies; at least 2x asked), on a thread of its own too (one arena)."""
    default, kept = probes(
        {"configure": False, "in_thread": in_thread}, {"configure": True, "in_thread": in_thread}
    )
    assert kept["kept"] is True
    assert kept["faults"] * 2 < default["faults"]


@pytest.mark.parametrize("value", ["0", "off"])
def test_the_environment_can_opt_out(value):
    """Opted out, the probe faults as glibc's default does: far more than kept. (Not against
    the default's own count: from one fresh process to the next that count is one of two, 77k or
    166k here, and an opted-out 77k once fell below half a default 166k.)"""
    kept, opted_out = probes({"configure": True}, {"configure": True, "env": {OPT_OUT_ENV: value}})
    assert opted_out["kept"] is False
    assert opted_out["faults"] > 2 * kept["faults"]


def test_a_cpu_engine_configures_it():
    code = (
        "import torch\n"
        "from baton_paged import LLM\n"
        "import baton_paged.host_memory as hm\n"
        "assert hm._configured is None\n"
        "LLM('random', kv_memory='16MiB', max_model_len=64)\n"
        "print(hm._configured)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.splitlines()[-1] == "True"
