"""Backend registry: lazy imports, auto choice, and errors that name the reason."""

import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from baton_paged.attention import (
    AttentionRequirements,
    BackendUnavailableError,
    available_backends,
    cpu_paged_backend,
    create_backend,
    flash_backend,
    resolve_backend_name,
    suggested_page_size,
    unsupported_reasons,
)
from baton_paged.attention.cpu_paged_backend import CpuPagedBackend
from baton_paged.attention.padded_backend import PaddedBackend
from baton_paged.attention.torch_backend import TorchBackend

CPU = AttentionRequirements(torch.device("cpu"), torch.float32, 16, 64, 8, 4)
CUDA_BF16 = AttentionRequirements(torch.device("cuda"), torch.bfloat16, 256, 64, 8, 4)


def test_cpu_gets_the_in_place_paged_kernel_by_default():
    assert resolve_backend_name("auto", CPU) == "cpu_paged"
    assert isinstance(create_backend("auto", CPU), CpuPagedBackend)
    assert isinstance(create_backend("padded", CPU), PaddedBackend)
    assert available_backends(CPU) == ["cpu_paged", "torch", "padded"]
    assert suggested_page_size("auto", CPU) == 16


def test_without_the_cpu_kernels_auto_falls_back_to_torch_and_naming_them_says_why(monkeypatch):
    monkeypatch.setattr(cpu_paged_backend, "unavailable_reason", lambda: "no C++ compiler")
    assert resolve_backend_name("auto", CPU) == "torch"
    assert isinstance(create_backend("auto", CPU), TorchBackend)
    with pytest.raises(BackendUnavailableError, match="'cpu_paged' cannot run here: no C\\+\\+"):
        create_backend("cpu_paged", CPU)


@pytest.mark.parametrize("dtype", [torch.float16])
def test_cpu_paged_refuses_dtypes_it_has_no_kernel_for(dtype):
    assert (
        "float32, bfloat16 or float64"
        in unsupported_reasons(replace(CPU, dtype=dtype))["cpu_paged"]
    )


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="unknown attention backend 'flash'.*flash_attn"):
        create_backend("flash", CPU)


@pytest.mark.parametrize("name", ["flash_attn", "xformers"])
def test_gpu_backend_chosen_on_cpu_says_it_needs_cuda(name):
    with pytest.raises(BackendUnavailableError, match=f"'{name}' cannot run here: needs a CUDA"):
        create_backend(name, CPU)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dtype": torch.float32}, "float16 and bfloat16 only"),
        ({"page_size": 16}, "for pages of 16 tokens"),
        ({"head_dim": 12}, "head dim <= 256 and a multiple of 8, not 12"),
        ({"head_dim": 512}, "not 512"),
    ],
)
def test_flash_capability_checks_name_the_reason(change, message):
    assert message in unsupported_reasons(replace(CUDA_BF16, **change))["flash_attn"]


def test_importing_the_package_loads_no_optional_kernel():
    code = (
        "import sys, baton_paged.attention\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('flash_attn', 'xformers')\n"
        "          or m.endswith(('flash_backend', 'xformers_backend'))]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
def test_auto_on_cuda_prefers_a_varlen_kernel_and_its_page_size():
    req = AttentionRequirements(torch.device("cuda"), torch.bfloat16, 16, 64, 8, 4)
    page_size = suggested_page_size("auto", req)
    name = resolve_backend_name("auto", replace(req, page_size=page_size))
    assert name in ("flash_attn", "xformers", "triton")
    if name == "flash_attn" and flash_backend._paged_varlen_kernel() is not None:
        assert page_size == 256  # the in-place kernel's pages
