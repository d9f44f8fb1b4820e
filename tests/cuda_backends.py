"""The two executors the CUDA backend's tests run on: a GPU ("cuda": torch.ops.pagedkv on
cuda tensors) and the SIMT emulator ("simt": the same kernels and glue run on the CPU by
torch_pagedkv.emulation, docs/emulation.md). A test takes the `be` fixture and writes
`be.device`, `be.ops` (torch_pagedkv or torch_pagedkv.emulation) and `be.ns` (the op
namespace); helpers that see only tensors use ops_of(tensor).

The emulator runs every CTA's threads one by one, so its share of CI is a deterministic
sample of the big grids (`@pytest.mark.simt_sample(n)`: one case in n, conftest.py);
PAGEDKV_SIMT_FULL=1 runs them all."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import torch_pagedkv as pk

try:
    from torch_pagedkv import emulation
except ImportError:  # a checkout built without PAGEDKV_SIMT=1
    emulation = None


@dataclass(frozen=True)
class CudaBackend:
    name: str  # "cuda" or "simt"

    @property
    def device(self) -> str:
        return "cuda" if self.name == "cuda" else "cpu"

    @property
    def ops(self):
        return pk if self.name == "cuda" else emulation

    @property
    def ns(self):
        return torch.ops.pagedkv if self.name == "cuda" else torch.ops.pagedkv_simt

    def gpu_name(self) -> str:
        return torch.cuda.get_device_name() if self.name == "cuda" else emulation.current_settings()["device"]

    def synchronize(self) -> None:
        if self.name == "cuda":
            torch.cuda.synchronize()


BACKENDS = [
    pytest.param(CudaBackend("cuda"), id="cuda",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
    pytest.param(CudaBackend("simt"), id="simt",
                 marks=pytest.mark.skipif(emulation is None,
                                          reason="the SIMT emulator is not built (make test)")),
]


def ops_of(t: torch.Tensor):
    """The ops of the executor that owns tensor t (cpu tensors: the emulator)."""
    return pk if t.is_cuda else emulation
