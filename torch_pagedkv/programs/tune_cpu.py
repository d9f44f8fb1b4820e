"""`pagedkv tune --cpu`: measures every CPU choice (torch_pagedkv/cpu_tuning) for a model
on this machine and writes the table the engine reads (LLM(cpu_tuning="auto") reads the
same file); `--show` prints what is in force and why, measuring nothing.

    pagedkv tune --cpu [--dtype float32|bfloat16] [--block-size 16] [--threads N]
                       [--out PATH] [--budget SECONDS] [--show]

The model is the demo's (programs/demo.py DEMO_CONFIG) unless --checkpoint names a local
Hugging Face checkpoint.
"""
from __future__ import annotations

import argparse

import torch

from ..cpu_tuning import resolve as cpu_resolve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pagedkv tune --cpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--checkpoint", default=None, help="a local HF checkpoint (default: the demo model)")
    p.add_argument("--out", default=None, help="table file (default: this CPU's in the cache folder)")
    p.add_argument("--budget", type=float, default=60.0, help="seconds for all measurements")
    p.add_argument("--show", action="store_true", help="print what is in force; measure nothing")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.checkpoint:
        from ..engine.model_source import load_model
        from ..integrations.hf import as_paged_model
        model = as_paged_model(load_model(args.checkpoint, torch.device("cpu"))[0]).to(dtype)
    else:
        from ..models.llama import TinyLlama
        from .demo import DEMO_CONFIG
        model = TinyLlama(DEMO_CONFIG).to(dtype)
    contexts = cpu_resolve.contexts_for_model(model, dtype, args.block_size)
    mode = args.out or "auto"
    tuning = cpu_resolve.resolve(mode, contexts, measure=not args.show,
                                 remeasure=not args.show, budget_s=args.budget,
                                 progress=print)
    print("\n".join(tuning.lines()))
    if tuning.note:
        print(tuning.note)
    return 0
