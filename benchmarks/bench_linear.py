"""Packed linear weights (layers/packed_linear.py) against aten's F.linear on this CPU.

The linear shapes of bench_vllm's checkpoint (hidden 512, 8 query / 2 KV heads of 64,
MLP 1536, vocabulary 8192) at decode-sized (2, 64) and prefill-sized (512, 2048) row
counts, float32 and bfloat16: microseconds per call of each, timed in interleaved
rounds (medians), their ratio, and each one's GFLOP/s against the roof of this machine
measured the same way (the best rate any product reached in the run). bfloat16's
packed path computes in float32 where the CPU has no bf16 dot products (AVX2). float32
is timed packed at every size, though the engine packs it only up to
the row count the CPU tuning table holds (default 64): this table is where that default comes from.

    python -m benchmarks.bench_linear [--rounds N] [--write-results]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks import machine
from benchmarks.results_file import write_section
from torch_pagedkv.layers import packed_linear as pl

SHAPES = {"q/o 512x512": (512, 512), "k/v 128x512": (128, 512),
          "gate/up 1536x512": (1536, 512), "down 512x1536": (512, 1536),
          "lm_head 8192x512": (8192, 512)}
ROWS = (2, 64, 512, 2048)


def seconds(fn, min_s: float = 0.05) -> float:
    fn()
    reps, t = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        el = time.perf_counter() - t
        if el >= min_s and reps >= 3:
            return el / reps


def interleaved(a, b, rounds: int) -> tuple[float, float]:
    ta, tb = [], []
    for r in range(rounds):
        for fn, out in ((a, ta), (b, tb)) if r % 2 == 0 else ((b, tb), (a, ta)):
            out.append(seconds(fn))
    return statistics.median(ta), statistics.median(tb)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args(argv)
    print(machine.line(torch.get_num_threads()), flush=True)
    if not pl.available():
        print("this torch cannot pack linear weights for oneDNN")
        return 0
    from torch_pagedkv.cpu_tuning import policy
    for n, k in SHAPES.values():  # packed at every size: the data the 64-row default is from
        policy.set_linear(torch.float32, n, k, 1 << 30)
    torch.manual_seed(0)
    rows = []  # (dtype, layer, m, aten s, packed s, GFLOP)
    for dtype in (torch.float32, torch.bfloat16):
        for name, (n, k) in SHAPES.items():
            # Built outside inference mode: an inference-tensor weight is never packed.
            lin = torch.nn.Linear(k, n, bias=False).to(dtype)
            w = lin.weight.detach().clone()
            assert pl.pack_linear_weights(lin) == 1
            with torch.inference_mode():
                for m in ROWS:
                    x = torch.randn(m, k).to(dtype)
                    ta, tp = interleaved(lambda: F.linear(x, w), lambda: lin(x), args.rounds)
                    rows.append((str(dtype)[6:], name, m, ta, tp, 2 * m * n * k / 1e9))
                    print(rows[-1], flush=True)
    roof = max(f / min(ta, tp) for *_, ta, tp, f in rows)  # the best rate of the run
    lines = [f"Roof: the best rate any product reached in this run, {roof:.0f} GFLOP/s "
             "(float32)", "", "| dtype | layer (out x in) | rows | aten us | packed us | "
             "speedup | aten % of roof | packed % of roof |", "|---" * 8 + "|"]
    for dtype, name, m, ta, tp, f in rows:
        lines.append(f"| {dtype} | {name} | {m} | {ta * 1e6:.0f} | {tp * 1e6:.0f} | "
                     f"**{ta / tp:.2f}x** | {f / ta / roof:.0%} | {f / tp / roof:.0%} |")
    threads = torch.get_num_threads()
    body = (f"Command: `python -m benchmarks.bench_linear --rounds {args.rounds}` "
            f"({machine.line(threads)}; medians of interleaved rounds; "
            "bf16 packed = float32 packed weight, input upcast, output rounded once)\n\n"
            + "\n".join(lines))
    print(body)
    if args.write_results:
        write_section("Packed linear weights (bench_linear)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
