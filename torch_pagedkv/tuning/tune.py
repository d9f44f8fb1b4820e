"""`pagedkv tune`: grid-search the CUDA launch configs on the GPU present and write the
launch-config table.

For each (head size, cache dtype, block size) it times, with CUDA events (median of
--repeats runs after warm-up):
  decode  paged_attention over the decode shapes (--decode-shapes, batch x context;
          32 query / 8 kv heads), for threads in {64, 128, 256} x partition size in
          {256, 512, 1024}: the objective is the sum over shapes of time / heuristic time;
  prefill a --prefill-tokens prompt attending to itself, threads in {64, 128, 256};
  write   reshape_and_cache of --write-tokens tokens, threads in {64, 128, 256, 512}.
The three are independent (each kernel reads only its own knobs), so they are searched
one after the other. Winners replace this GPU's entries in --out (other GPUs' entries
are kept); the table is then also active in this process.

    pagedkv tune [--heads 128] [--dtypes bfloat16 float8_e4m3fn] [--block-sizes 16]
                 [--quick] [--repeats N] [--out PATH] [--dry-run]
"""
from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time
from dataclasses import replace

import torch

from .. import ops, reference
from .._load import HAS_CUDA_KERNELS
from . import table
from .table import LaunchConfig

NUM_HEADS, NUM_KV_HEADS = 32, 8
DECODE_THREADS = (64, 128, 256)
PARTITION_SIZES = (256, 512, 1024)
PREFILL_THREADS = (64, 128, 256)
WRITE_THREADS = (64, 128, 256, 512)


def unavailable() -> str | None:
    """Why tuning cannot run here, or None."""
    if not torch.cuda.is_available():
        return ("no CUDA device is available (torch.cuda.is_available() is False); it "
                "measures the kernels of the GPU it runs on, so run it on a machine with one")
    if not HAS_CUDA_KERNELS:
        return ("torch_pagedkv was built without CUDA kernels: rebuild with a CUDA build of "
                "torch and nvcc on PATH (CUDA_HOME set)")
    return None


def query_dtype(cache_dtype: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if cache_dtype in reference.FP8_DTYPES else cache_dtype


def median_us(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def random_cache(num_blocks, block_size, head_size, cache_dtype, gen):
    x = torch.randn(num_blocks, block_size, NUM_KV_HEADS, head_size, device="cuda", generator=gen)
    if cache_dtype in reference.FP8_DTYPES:
        return reference.quantize(x, cache_dtype, None)
    return x.to(cache_dtype)


def attention_workload(seqs, head_size, cache_dtype, block_size, gen):
    """A closure running paged_attention over sequences given as (q_len, seq_len)."""
    blocks = [math.ceil(s / block_size) for _, s in seqs]
    num_blocks = sum(blocks)
    kc = random_cache(num_blocks, block_size, head_size, cache_dtype, gen)
    vc = random_cache(num_blocks, block_size, head_size, cache_dtype, gen)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen).int()
    table_ = torch.zeros(len(seqs), max(blocks), dtype=torch.int32, device="cuda")
    start = 0
    for i, n in enumerate(blocks):
        table_[i, :n] = perm[start:start + n]
        start += n
    q_lens = torch.tensor([q for q, _ in seqs])
    qsl = torch.cat([torch.zeros(1, dtype=torch.int64), q_lens.cumsum(0)]).int().cuda()
    seq_lens = torch.tensor([s for _, s in seqs], dtype=torch.int32, device="cuda")
    q = torch.randn(int(q_lens.sum()), NUM_HEADS, head_size, device="cuda", generator=gen)
    q = q.to(query_dtype(cache_dtype))
    scale = head_size ** -0.5
    ones = torch.ones(1, device="cuda")
    fp8 = cache_dtype in reference.FP8_DTYPES
    return lambda: ops.paged_attention(q, kc, vc, table_, seq_lens, qsl, scale,
                                       k_scale=ones if fp8 else None, v_scale=ones if fp8 else None)


def write_workload(tokens, head_size, cache_dtype, block_size, gen):
    num_blocks = math.ceil(tokens / block_size)
    kc = random_cache(num_blocks, block_size, head_size, cache_dtype, gen)
    vc = random_cache(num_blocks, block_size, head_size, cache_dtype, gen)
    k = torch.randn(tokens, NUM_KV_HEADS, head_size, device="cuda", generator=gen)
    k = k.to(query_dtype(cache_dtype))
    v = torch.randn_like(k)
    slots = torch.randperm(num_blocks * block_size, device="cuda", generator=gen)[:tokens]
    return lambda: ops.reshape_and_cache(k, v, kc, vc, slots)


def tune_key(gpu, head_size, dtype_name, block_size, args, gen) -> table.Entry:
    cache_dtype = getattr(torch, dtype_name)
    base = table.heuristic(head_size, dtype_name, block_size)

    def timed(cfg: LaunchConfig, fn) -> float:
        table.apply([table.Entry(gpu, head_size, dtype_name, block_size, cfg)])
        return median_us(fn, args.repeats)

    decode = [attention_workload([(1, ctx)] * batch, head_size, cache_dtype, block_size, gen)
              for batch, ctx in args.decode_shapes]
    base_times = [timed(base, fn) for fn in decode]
    best, best_score, best_times = base, float(len(decode)), base_times
    for threads, part in itertools.product(DECODE_THREADS, PARTITION_SIZES):
        cfg = replace(base, decode_threads=threads, partition_size=part)
        times = [timed(cfg, fn) for fn in decode]
        score = sum(t / b for t, b in zip(times, base_times))
        if score < best_score:
            best, best_score, best_times = cfg, score, times
    del decode

    n = args.prefill_tokens
    prefill = attention_workload([(n, n)], head_size, cache_dtype, block_size, gen)
    prefill_times = {t: timed(replace(best, prefill_threads=t), prefill) for t in PREFILL_THREADS}
    best = replace(best, prefill_threads=min(prefill_times, key=prefill_times.get))
    del prefill

    write = write_workload(args.write_tokens, head_size, cache_dtype, block_size, gen)
    write_times = {t: timed(replace(best, write_threads=t), write) for t in WRITE_THREADS}
    best = replace(best, write_threads=min(write_times, key=write_times.get))
    del write

    measured = {
        "decode_us": {f"{b}x{c}": round(t, 2) for (b, c), t in zip(args.decode_shapes, best_times)},
        "decode_us_heuristic": {f"{b}x{c}": round(t, 2)
                                for (b, c), t in zip(args.decode_shapes, base_times)},
        "prefill_us": round(prefill_times[best.prefill_threads], 2),
        "prefill_tokens": n,
        "write_us": round(write_times[best.write_threads], 2),
        "write_tokens": args.write_tokens,
        "torch": torch.__version__,
    }
    entry = table.Entry(gpu, head_size, dtype_name, block_size, best, measured)
    table.apply([entry])
    return entry


def parse_shape(s: str) -> tuple[int, int]:
    batch, ctx = s.lower().split("x")
    return int(batch), int(ctx)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagedkv tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, nargs="+", default=list(table.SPECIALIZED_HEAD_SIZES))
    parser.add_argument("--dtypes", nargs="+", default=list(table.DTYPES), choices=table.DTYPES)
    parser.add_argument("--block-sizes", type=int, nargs="+",
                        default=list(table.SPECIALIZED_BLOCK_SIZES))
    parser.add_argument("--decode-shapes", type=parse_shape, nargs="+",
                        default=[(64, 4096), (8, 32768)], help="batch x context, e.g. 64x4096")
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--write-tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true",
                        help="smaller shapes and 5 repeats (a few seconds per key)")
    parser.add_argument("--out", default=str(table.DEFAULT_PATH),
                        help="table to update (default: the one shipped in the package)")
    parser.add_argument("--dry-run", action="store_true", help="print, do not write --out")
    args = parser.parse_args(argv)
    if (why := unavailable()) is not None:
        print(f"pagedkv tune: {why}", file=sys.stderr)
        return 1
    if args.quick:
        args.decode_shapes = [(32, 4096), (4, 16384)]
        args.prefill_tokens, args.write_tokens, args.repeats = 1024, 8192, 5

    gpu = torch.cuda.get_device_name()
    gen = torch.Generator(device="cuda").manual_seed(0)
    keys = list(itertools.product(args.heads, args.dtypes, args.block_sizes))
    print(f"tuning {len(keys)} keys on {gpu}; decode shapes "
          f"{', '.join(f'{b}x{c}' for b, c in args.decode_shapes)}, {args.repeats} repeats")
    print(f"{'head':>4} {'dtype':>14} {'block':>5} | {'dec thr':>7} {'part':>5} {'pre thr':>7} "
          f"{'wr thr':>6} | decode speedup vs heuristic")
    entries = []
    t0 = time.perf_counter()
    for head, dtype_name, block in keys:
        e = tune_key(gpu, head, dtype_name, block, args, gen)
        m = e.measured
        speedups = [m["decode_us_heuristic"][k] / m["decode_us"][k] for k in m["decode_us"]]
        c = e.config
        print(f"{head:>4} {dtype_name:>14} {block:>5} | {c.decode_threads:>7} {c.partition_size:>5} "
              f"{c.prefill_threads:>7} {c.write_threads:>6} | "
              + " ".join(f"{s:.2f}x" for s in speedups), flush=True)
        entries.append(e)
    print(f"tuned {len(entries)} keys in {time.perf_counter() - t0:.0f} s")
    if args.dry_run:
        return 0
    try:
        old = table.load(args.out)
    except FileNotFoundError:
        old = []
    table.save(table.merge(old, entries), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
