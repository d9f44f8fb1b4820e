"""Which CPU this is, as the CPU tuning table keys it and every benchmark names it.

A measured choice holds for one CPU model with one set of ISA extensions, one core
count, one torch build and one thread count; any of them changing can move the best
choice (a GEMM 2.2x faster packed on AVX-512 is no faster on AVX2), so all of them are
the key. Probed from /proc/cpuinfo and torch, never assumed.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from dataclasses import asdict, dataclass

import torch

# The ISA extensions any of our CPU paths (kernels, oneDNN/MKL GEMMs) can use: the key
# holds those this CPU has. Others (sse4, aes, ...) do not move a choice.
KERNEL_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile",
                "amx_bf16", "amx_int8", "amx_fp16")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break
                    continue
                name, _, value = line.partition(":")
                fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_flags() -> frozenset[str]:
    return frozenset(_cpuinfo().get("flags", "").split())


def num_cores() -> int:
    """The cores this process may run on (its affinity), not the host's total."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class CpuIdentity:
    model: str        # "AMD EPYC" (/proc/cpuinfo model name), or platform.processor()
    cpu_id: str       # vendor, family, model, stepping: "AuthenticAMD 25/1/1"
    flags: tuple[str, ...]  # the KERNEL_FLAGS this CPU has, in that order
    cores: int
    torch: str        # torch.__version__
    threads: int      # torch.get_num_threads() when probed

    @property
    def key(self) -> str:
        """A file-name-safe id: readable head, hash of every field."""
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()
        head = re.sub(r"[^a-z0-9]+", "-", self.model.lower()).strip("-")[:32] or "cpu"
        return f"{head}-{self.cores}c-{self.threads}t-{digest[:12]}"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["flags"] = list(self.flags)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CpuIdentity":
        return cls(model=str(d["model"]), cpu_id=str(d["cpu_id"]),
                   flags=tuple(str(f) for f in d["flags"]), cores=int(d["cores"]),
                   torch=str(d["torch"]), threads=int(d["threads"]))


def probe(threads: int | None = None) -> CpuIdentity:
    """This CPU, as the table keys it (threads: torch's current count unless given)."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    cpu_id = " ".join(info.get(k, "?") for k in ("vendor_id",)) + " " + "/".join(
        info.get(k, "?") for k in ("cpu family", "model", "stepping"))
    return CpuIdentity(
        model=info.get("model name") or platform.processor() or platform.machine(),
        cpu_id=cpu_id.strip(),
        flags=tuple(f for f in KERNEL_FLAGS if f in flags),
        cores=num_cores(),
        torch=torch.__version__,
        threads=int(threads if threads is not None else torch.get_num_threads()))


def kernel_isa() -> str:
    """The ISA variant the CPU attention kernels run now ("avx2", "avx512", ...): the
    kernels' knob where the library chooses at run time, else the build's record."""
    from .. import knobs
    if hasattr(knobs, "cpu_isa_info"):
        return knobs.cpu_isa_info()["active"]
    from .._load import LIBRARY_PATH, _read_beside
    return _read_beside(os.path.dirname(LIBRARY_PATH), "_C.isa") or "avx2"


def describe(threads: int | None = None) -> str:
    """One line naming the CPU as probed, for benchmark headers and RESULTS.md:
    model, the ISA flags our paths can use, cores, torch and its CPU capability, the
    kernels' ISA variant, threads."""
    ident = probe(threads)
    return (f"{ident.model} ({ident.cpu_id}), {ident.cores} cores, flags "
            f"{' '.join(ident.flags) or 'none of ours'}; torch {ident.torch} "
            f"(CPU capability {torch.backends.cpu.get_cpu_capability()}); kernels "
            f"{kernel_isa()}; {ident.threads} thread{'' if ident.threads == 1 else 's'}")
