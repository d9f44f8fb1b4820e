"""`pagedkv occupancy`: theoretical occupancy of each CUDA kernel config on the GPU
present, from the CUDA occupancy API (cudaOccupancyMaxActiveBlocksPerMultiprocessor)
through the private op pagedkv::_occupancy: registers and spills per thread, shared
memory per CTA, resident CTAs per SM and the resulting share of the SM's threads.

    pagedkv occupancy [--heads 128 ...] [--dtypes bfloat16 ...] [--threads 128 256]
                      [--num-heads 32 --num-kv-heads 8] [--partition-size 512] [--generic]
"""
from __future__ import annotations

import argparse
import sys

import torch

from .. import knobs
from . import table
from .tune import unavailable

ATTENTION_KERNELS = ("decode", "decode_reduce", "prefill")


def query_dtype(cache_dtype: str) -> str:
    return "bfloat16" if cache_dtype.startswith("float8") else cache_dtype


def row(kernel, head, qd, cd, threads, args, show_head=True) -> str:
    blocks, regs, spill, static_smem, dyn_smem, _, sm_threads, _ = \
        torch.ops.pagedkv._occupancy(kernel, qd, cd, head, args.num_heads, args.num_kv_heads,
                                     threads, args.partition_size)
    occ = blocks * threads / sm_threads
    smem_kb = (static_smem + dyn_smem) / 1024
    shown = str(head) if show_head else "-"  # the cache kernels do not depend on it
    return (f"{kernel:<17} {shown:>4} {qd + '/' + cd:>24} {threads:>7} {regs:>5} {spill:>7} "
            f"{smem_kb:>8.1f} {blocks:>7} {occ:>9.0%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagedkv occupancy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, nargs="+", default=list(table.SPECIALIZED_HEAD_SIZES))
    parser.add_argument("--dtypes", nargs="+", default=list(table.DTYPES), choices=table.DTYPES)
    parser.add_argument("--threads", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--partition-size", type=int, default=512)
    parser.add_argument("--generic", action="store_true",
                        help="the generic (run-time head size) kernels instead of the specialized")
    args = parser.parse_args(argv)
    if (why := unavailable()) is not None:
        print(f"pagedkv occupancy: {why}", file=sys.stderr)
        return 1
    if args.generic:
        knobs.set_knob("generic_kernels", True)

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    print(f"{props.name}: {props.multi_processor_count} SMs, "
          f"{props.max_threads_per_multi_processor} threads/SM; {args.num_heads} query / "
          f"{args.num_kv_heads} kv heads, decode partition {args.partition_size}"
          + (", generic kernels" if args.generic else ""))
    print(f"{'kernel':<17} {'head':>4} {'query/cache dtype':>24} {'threads':>7} {'regs':>5} "
          f"{'spill B':>7} {'smem KB':>8} {'CTAs/SM':>7} {'occupancy':>9}")
    for kernel in ATTENTION_KERNELS:
        for head in args.heads:
            for cd in args.dtypes:
                threads = [32 * -(-head // 256)] if kernel == "decode_reduce" else args.threads
                for t in threads:
                    print(row(kernel, head, query_dtype(cd), cd, t, args))
    for cd in args.dtypes:
        for t in (64, 128, 256, 512):
            print(row("reshape_and_cache", 64, query_dtype(cd), cd, t, args, show_head=False))
    for kernel in ("copy_blocks", "swap_blocks"):
        print(row(kernel, 64, "float32", "float32", 256, args, show_head=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
