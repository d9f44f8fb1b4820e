"""The `pagedkv` command: one subcommand per job, each implemented in its own module.

A top-level module, outside the torch_pagedkv package, so that `pagedkv --help` imports
neither torch nor the ops (well under a second); the chosen subcommand's module loads
them. `python -m torch_pagedkv.cli` runs the same command.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, function, help). Each function takes the remaining argv.
SUBCOMMANDS = {
    "demo": ("torch_pagedkv.programs.demo", "main",
             "case study 1: a chatbot sharing a system prompt, with and without prefix caching"),
    "trace": ("torch_pagedkv.programs.trace", "main",
              "one request through the engine, step by step, from real engine state"),
    "showcase": ("torch_pagedkv.showcase", "main",
                 "the four ops on random data, checked against the reference, with timings"),
    "tune": ("torch_pagedkv.programs.tune", "main",
             "grid-search CUDA launch configs on this GPU and write the config table; "
             "--cpu: measure this CPU's tuning table (--show: print what is in force)"),
    "occupancy": ("torch_pagedkv.tuning.occupancy", "main",
                  "theoretical occupancy of each CUDA kernel config"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="pagedkv", description=__doc__)
    parser.add_argument("command", choices=sorted(SUBCOMMANDS),
                        help="; ".join(f"{k}: {v[2]}" for k, v in SUBCOMMANDS.items()))
    args, rest = parser.parse_known_args(argv)
    module, func, _ = SUBCOMMANDS[args.command]
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
