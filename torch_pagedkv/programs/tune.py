"""`pagedkv tune`: the CUDA launch-config grid search (tuning/tune.py) on a GPU, or with
--cpu the CPU tuning table of this machine (programs/tune_cpu.py)."""
from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if "--cpu" in argv:
        from . import tune_cpu
        argv.remove("--cpu")
        return tune_cpu.main(argv)
    from ..tuning import tune
    return tune.main(argv)
