"""Gives the CUDA launch-config table its lazy loader: the kernel of
pagedkv::_install_launch_configs, which the C++ launch-config table runs once, at its
first use (csrc/cuda/launch_config.cpp). The JSON is read then, not at import, and only by
processes that launch CUDA kernels. It sits above both the library loader (_load.py) and
the table (tuning/table.py, which imports _load), so that neither imports the other's
layer upward; `import torch_pagedkv` registers it."""
from __future__ import annotations

import torch

from ._load import HAS_CUDA_KERNELS


def _install_launch_configs() -> None:
    from .tuning import table
    table.install()


if HAS_CUDA_KERNELS:
    _LIB = torch.library.Library("pagedkv", "IMPL")
    _LIB.impl("_install_launch_configs", _install_launch_configs, "CompositeExplicitAutograd")
