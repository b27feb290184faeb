"""Page-locked host memory at its exact size, for the host swap pool.

Swap copies between device and host run asynchronously only from page-locked ("pinned") host
memory. torch's pinned allocator (``pin_memory=True``) rounds every block up to the next power of
two, so a 9 GiB swap pool would lock 16 GiB of RAM. Instead the pool is allocated as ordinary
memory and registered with CUDA in place (``cudaHostRegister``), exactly its size; it is
unregistered when the tensor is freed. Where registration fails, torch's allocator is used.
"""

from __future__ import annotations

import weakref

import torch

REGISTER_PORTABLE = 1
"""cudaHostRegisterPortable: pinned for every CUDA context, not only the current one."""


def pinned_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.zeros(shape, dtype=dtype)
    cudart = torch.cuda.cudart()
    pointer = tensor.data_ptr()
    if int(cudart.cudaHostRegister(pointer, tensor.nbytes, REGISTER_PORTABLE)) != 0:
        return torch.zeros(shape, dtype=dtype, pin_memory=True)
    weakref.finalize(tensor, cudart.cudaHostUnregister, pointer)
    return tensor
