"""Every PAGEDKV_* environment variable, and the runtime switches of the kernels.

Build time (read by setup.py and the Makefile):

=========================  =================================================================
PAGEDKV_CUDA               0, 1 or auto (default): build the CUDA kernels (auto: when torch
                           is a CUDA build and nvcc is found)
PAGEDKV_CPU_ISA            no longer a build setting: every ISA variant of the CPU kernels
                           is compiled (avx2, avx512, avx512_bf16 on x86) and this is the
                           run-time knob cpu_isa below
PAGEDKV_BUILD_CACHE        1 (default) or 0: `make build` reuses a library built from the
                           same sources; 0 always compiles
PAGEDKV_SIMT               1: also build torch_pagedkv._simt, the CUDA kernels and glue run
                           on the CPU by the SIMT emulator (`make test` sets it;
                           docs/emulation.md)
=========================  =================================================================

Run time, Python (read where used):

=========================  =================================================================
PAGEDKV_LAUNCH_CONFIGS     a launch-config file whose entries win over the shipped table
                           (tuning/table.py), read at the first CUDA launch
PAGEDKV_HASH_SEED          seed of the prefix-cache block hashes when the BlockManager gets
                           no hash_seed (cache/block_hash.py); unset: random per process
PAGEDKV_TP_LM_HEAD         vocab (default) or replicated: a tensor-parallel engine splits
                           the lm_head by vocabulary (an all-gather of the logits) or keeps
                           it whole on every rank (distributed/sharding.py)
PAGEDKV_SIMT_ORDER         random (default), forward or reverse: the emulator's thread order
                           between synchronization points when torch_pagedkv.emulation
                           loads; PAGEDKV_SIMT_SEED seeds the random order
PAGEDKV_SIMT_LIBRARY       another build of the emulated library to load (scripts/
                           simt_teeth.py's mutants)
PAGEDKV_SIMT_FULL          tests: 1 runs every emulated case of the CUDA test grids (CI
                           runs a fixed sample); PAGEDKV_SIMT_SWEEP_EXAMPLES sizes the
                           emulated hypothesis sweep (default 12)
=========================  =================================================================

Run time, kernels: each is read once per process, at the first op call, and can then be
changed with `set_knob` or `override` (the op calls read the current value, never the
environment):

=========================  ===============  ================================================
variable                   knob             values
=========================  ===============  ================================================
PAGEDKV_GENERIC_KERNELS    generic_kernels  on: the generic (run-time shape) kernels instead
                                            of the specialized ones (CUDA; the CPU kernels
                                            are all run-time shape)
PAGEDKV_ATTENTION_PATH     attention_path   auto (default), decode or prefill: force one
                                            CUDA attention kernel whatever the batch
PAGEDKV_DEBUG              debug            on: the CUDA ops also range-check the metadata
                                            on the host (a synchronization per call)
PAGEDKV_DECODE_SPLITS      decode_splits    auto (default), 1, 2, 3, 4, 8 or 16: at most
                                            this many split-K decode CTAs per row and kv
                                            head, each walking several partitions
PAGEDKV_CPU_ISA            cpu_isa          auto (default), avx2, avx512 or avx512_bf16:
                                            the CPU kernels' ISA variant (auto: the widest
                                            this CPU runs; cpu_isa_info() lists them).
                                            Naming one this CPU cannot run raises
                                            RuntimeError (the env var: at the first op)
PAGEDKV_CPU_VECTORS_       cpu_vectors_     32 (default), 8, 16, 64 or 128: CPU attention
PER_HEAD                   per_head         query vectors per kv head in a causal work item
PAGEDKV_CPU_VECTORS_       cpu_vectors_     64 (default), 16, 32, 128 or 256: query vectors
PER_ITEM                   per_item         per decode work item across kv heads
PAGEDKV_CPU_PREFIX_        cpu_prefix_      256 (default), 64, 128 or 512: query vectors per
VECTORS_PER_HEAD           vectors_per_     kv head in a causal=False (shared-prefix) tile
                           head
PAGEDKV_CPU_SERIAL_        cpu_serial_      2048 (default), 0, 512, 8192 or 32768: a CPU
PRODUCTS                   products         attention call of at most this many query-key
                                            products runs on the calling thread
=========================  ===============  ================================================

The cpu_* tiling knobs only split the work (csrc/cpu/attention.cpp plan_items): results
differ at most by float rounding order.

A flag variable is on when it is set, non-empty and not "0".

    with knobs.override(generic_kernels=True):
        out = torch_pagedkv.paged_attention(...)
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import torch

from . import _load  # noqa: F401  (defines torch.ops.pagedkv._set_knob)

KNOBS = ("generic_kernels", "attention_path", "debug", "decode_splits", "cpu_isa",
         "cpu_vectors_per_head", "cpu_vectors_per_item", "cpu_prefix_vectors_per_head",
         "cpu_serial_products")

# Every library whose kernels read the knobs: the main one, and the SIMT-emulated CUDA
# kernels once torch_pagedkv.emulation has loaded them (each keeps its own copy).
_SETTERS = [torch.ops.pagedkv._set_knob]


def set_knob(name: str, value: bool | str) -> str:
    """Sets a kernel knob (a bool for a flag, a string otherwise) and returns its
    previous value as a string ("0"/"1" for a flag). Raises RuntimeError on an unknown
    name or value."""
    if isinstance(value, bool):
        value = "1" if value else "0"
    previous = _SETTERS[0](name, value)
    for other in _SETTERS[1:]:
        other(name, value)
    return previous


@contextlib.contextmanager
def override(**knobs: bool | str) -> Iterator[None]:
    """Sets the given knobs for the duration of the block, then restores their values."""
    previous: list[tuple[str, str]] = []
    try:
        for name, value in knobs.items():
            previous.append((name, set_knob(name, value)))
        yield
    finally:
        for name, value in reversed(previous):
            set_knob(name, value)


def cpu_isa_info() -> dict:
    """The CPU kernels' ISA variants: {"compiled": [...], "runnable": [...] (on this CPU),
    "active": the one the ops run now (cpu_isa, "auto" resolved), "missing": {variant:
    [the CPU flags this CPU lacks for it]}}."""
    return json.loads(torch.ops.pagedkv._cpu_isa_info())
