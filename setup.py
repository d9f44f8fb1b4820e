"""Builds torch_pagedkv._C: TORCH_LIBRARY registrations only (no pybind), py_limited_api.

PAGEDKV_CUDA=0|1|auto (default auto): build the CUDA kernels when torch is a CUDA
build and nvcc is found. PAGEDKV_SIMT=1 also builds torch_pagedkv._simt, the same CUDA
kernels run on the CPU by the SIMT emulator (tests; docs/emulation.md). PAGEDKV_CPU_ISA=avx2|avx512|native|generic (default avx2, the
portable choice for a wheel; `make` picks avx512 on a CPU that has it) sets the ISA of the
CPU kernels (16-float at::vec vectors with avx512, 8 otherwise); torch_pagedkv checks at
load time that the CPU has it.

The library is tied to the torch it is compiled against (C++ extensions are not ABI
compatible across torch minor versions): the package requires that torch's X.Y series,
and the build records the version in _C.torch, which torch_pagedkv checks at import.
"""
import glob
import os

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))

CPU_ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
    "native": ["-march=native", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "generic": ["-DCPU_CAPABILITY=DEFAULT"],
}


def torch_requirement() -> str:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return f"torch>={major}.{minor},<{major}.{int(minor) + 1}"


def want_cuda() -> bool:
    mode = os.environ.get("PAGEDKV_CUDA", "auto").lower()
    if mode in ("0", "false", "no"):
        return False
    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if mode in ("1", "true", "yes") and not available:
        raise RuntimeError(
            "PAGEDKV_CUDA=1 but torch is not a CUDA build or nvcc was not found "
            f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME})")
    return available


def sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extension():
    isa = os.environ.get("PAGEDKV_CPU_ISA", "avx2").lower()
    if isa not in CPU_ISA_FLAGS:
        raise RuntimeError(f"PAGEDKV_CPU_ISA must be one of {sorted(CPU_ISA_FLAGS)}, got {isa!r}")
    cxx = ["-O3", "-g0", "-fopenmp", "-Wno-unknown-pragmas",
           # GCC 12 flags its own AVX-512 intrinsic headers (thousands of lines of noise)
           "-Wno-maybe-uninitialized", f'-DPAGEDKV_CPU_ISA="{isa}"'] + CPU_ISA_FLAGS[isa]
    common = dict(
        name="torch_pagedkv._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    srcs = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    if not want_cuda():
        return cpp_extension.CppExtension(sources=srcs, extra_compile_args={"cxx": cxx}, **common)
    srcs += sources("csrc/cuda/*.cpp") + sources("csrc/cuda/*.cu")
    # nvcc rejects -g0 ("Unknown option"); it emits no host debug info unless given -g.
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
            "-DPAGEDKV_CUDA_BUILD"]
    return cpp_extension.CUDAExtension(
        sources=srcs,
        extra_compile_args={"cxx": cxx + ["-DPAGEDKV_CUDA_BUILD"], "nvcc": nvcc},
        **common)


def simt_extension():
    """torch_pagedkv._simt: the CUDA kernels and their glue compiled by the host compiler
    against the SIMT emulator (csrc/simt), registered as torch.ops.pagedkv_simt on CPU
    tensors: test-only (PAGEDKV_SIMT=1; `make test` builds it). It needs the toolkit's
    headers (cuda_fp16.h, cuda_bf16.h, cuda_fp8.h, driver_types.h), not a CUDA torch."""
    cuda_home = cpp_extension.CUDA_HOME or os.environ.get("CUDA_HOME", "/usr/local/cuda")
    include = os.path.join(cuda_home, "include")
    if not os.path.exists(os.path.join(include, "cuda_fp8.h")):
        raise RuntimeError(f"PAGEDKV_SIMT=1 needs the CUDA toolkit's headers; none in {include}")
    cxx = ["-O2", "-g0", "-fvisibility=hidden", "-fvisibility-inlines-hidden",
           "-Wno-unknown-pragmas", "-Wno-class-memaccess", "-Wno-maybe-uninitialized",
           "-DPAGEDKV_SIMT", "-DPAGEDKV_OPS_NS=pagedkv_simt", "-DPAGEDKV_DEVICE_KEY=CPU"]
    return cpp_extension.CppExtension(
        name="torch_pagedkv._simt",
        sources=sources("csrc/simt/*.cpp"),
        # The emulator's cuda_runtime.h first, so it stands in for the toolkit's.
        include_dirs=[os.path.join(ROOT, "csrc", "simt", "include"), os.path.join(ROOT, "csrc"),
                      include],
        extra_compile_args={"cxx": cxx},
        py_limited_api=True)


def want_simt() -> bool:
    return os.environ.get("PAGEDKV_SIMT", "0").lower() in ("1", "true", "yes")


class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    """Writes _C.isa and _C.torch beside the built library (in the tree with --inplace, in
    the wheel otherwise): torch_pagedkv reads them at import to refuse a build that this
    CPU cannot run or that another torch version was compiled for."""

    def run(self):
        super().run()
        records = {"_C.isa": os.environ.get("PAGEDKV_CPU_ISA", "avx2").lower(),
                   "_C.torch": torch.__version__.split("+")[0]}
        for ext in self.extensions:  # the in-tree path with --inplace, build/lib otherwise
            here = os.path.dirname(self.get_ext_fullpath(ext.name))
            for name, value in records.items():
                with open(os.path.join(here, name), "w") as f:
                    f.write(value + "\n")


setup(
    install_requires=[torch_requirement(), "numpy", "tqdm"],
    ext_modules=[extension()] + ([simt_extension()] if want_simt() else []),
    cmdclass={"build_ext": BuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
