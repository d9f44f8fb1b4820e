"""Loads the compiled op library (torch_pagedkv/_C*.so) with torch.ops.load_library.
The bottom layer: it imports nothing of the package (the CUDA launch-config table's
loader is registered one layer up, in _launch_configs.py)."""
from __future__ import annotations

import glob
import os
import platform

import torch

# The baseline ISA of an x86 build (everything but the CPU kernels' wider variants, which
# the library itself picks by what the CPU runs: the knob cpu_isa).
_REQUIRED_CPU_FLAGS = {"avx2": ("avx2", "fma", "f16c")}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _check_cpu(variants: str) -> None:
    """A library whose baseline is AVX2 crashes on a CPU without it: refuse to load
    instead. `variants`: the _C.isa record, the CPU kernels' variants, baseline first."""
    isa = (variants.split() or ["avx2"])[0]
    need = _REQUIRED_CPU_FLAGS.get(isa)
    if not need or platform.machine() not in ("x86_64", "AMD64"):
        return
    flags = _cpu_flags()
    missing = [f for f in need if flags and f not in flags]
    if missing:
        raise RuntimeError(
            f"torch_pagedkv's x86 build needs {isa} but this CPU lacks {missing}: the "
            "library requires AVX2, FMA and F16C on x86-64")


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def check_torch(built: str, running: str = torch.__version__) -> None:
    """C++ extensions are not ABI compatible across torch minor versions: a library built
    for another one fails to load or crashes, so refuse it with the fix instead."""
    if _major_minor(built) != _major_minor(running):
        raise ImportError(
            f"torch_pagedkv._C was built against torch {_major_minor(built)} but torch "
            f"{_major_minor(running)} is running: rebuild with `make build` (or "
            "`pip install --no-build-isolation .`)")


def _read_beside(here: str, name: str) -> str | None:
    """A record setup.py writes beside the library (_C.isa, _C.torch); None if absent."""
    path = os.path.join(here, name)
    return open(path).read().strip() if os.path.exists(path) else None


def load() -> str:
    # PAGEDKV_LIBRARY_DIR: a library built elsewhere, e.g. against the vLLM test
    # environment's torch (make test-vllm), while the checkout's own is for the main one.
    here = os.environ.get("PAGEDKV_LIBRARY_DIR") or os.path.dirname(os.path.abspath(__file__))
    found = sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd")))
    if not found:
        raise ImportError(
            "torch_pagedkv._C is not built: run `make build` (or "
            "`pip install --no-build-isolation .`) in the checkout")
    path = found[0]
    _check_cpu(_read_beside(here, "_C.isa") or "avx2")
    built_torch = _read_beside(here, "_C.torch")
    if built_torch is not None:  # a build older than the record is not checked
        check_torch(built_torch)
    torch.ops.load_library(path)
    return path


LIBRARY_PATH = load()
HAS_CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key("pagedkv::paged_attention", "CUDA")
