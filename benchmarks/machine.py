"""Where a benchmark ran: the CPU as probed (cpu_tuning/identity.py), never a fixed string.

Every benchmark prints `line(threads)` first and puts it in its RESULTS.md section; its
--json output carries `as_dict(threads)` under "machine" (or "cpu" where "machine" was
already taken). `threads` is the count the benchmark ran with, not the process default.
"""
from __future__ import annotations

from torch_pagedkv.cpu_tuning.identity import describe, probe


def line(threads: int | None = None) -> str:
    """'Machine: <model (id), cores, ISA flags; torch (capability); kernels; threads>'."""
    return f"Machine: {describe(threads)}"


def as_dict(threads: int | None = None) -> dict:
    return probe(threads).as_dict()
