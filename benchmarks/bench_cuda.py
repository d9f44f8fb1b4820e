"""Benchmark of the CUDA kernels on the GPU present, against the device's copy bandwidth.

(a) device copy bandwidth (tensor copy of 2 GiB, GB/s counting read + write);
(b) reshape_and_cache GB/s (input read + cache write) writing batch x context tokens;
(c) decode paged_attention GB/s (K/V bytes, each read once) at batch 64 x context 4096
    and batch 8 x context 32768, 32 query / 8 kv heads, head 128, block 16, bf16 and
    fp8 (e4m3fn, bf16 queries), with (b) and (c) as ratios to (a);
(d) prefill tokens/s: an 8192-token prompt, and a 2048-token chunk over a 6144-token
    cached prefix;
(e) specialized vs generic kernels (the generic_kernels knob) on decode and prefill.
Times are medians of CUDA-event timed repeats after warm-up. Without a GPU it says so and
exits 0 (make bench runs every benchmark).

    python -m benchmarks.bench_cuda [--repeats N] [--json PATH] [--write-results]
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch

import torch_pagedkv as pk
from torch_pagedkv import knobs, reference
from torch_pagedkv.tuning.tune import (
    NUM_HEADS, NUM_KV_HEADS, attention_workload, median_us, random_cache as tuned_random_cache)

HEADS, KV_HEADS = NUM_HEADS, NUM_KV_HEADS  # the tuner's workload shape
HEAD, BLOCK = 128, 16
DECODE_SHAPES = [(64, 4096), (8, 32768)]
CACHE_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


def median_s(fn, repeats: int, warmup: int = 3) -> float:
    return median_us(fn, repeats, warmup) / 1e6


def random_cache(num_blocks, cache_dtype, gen):
    return tuned_random_cache(num_blocks, BLOCK, HEAD, cache_dtype, gen)


def attention_setup(seqs, cache_dtype, gen):
    """paged_attention over sequences (q_len, seq_len), blocks scattered (the tuner's
    workload, 32/8 heads, head 128), and the K/V bytes a decode reads."""
    blocks = sum(math.ceil(s / BLOCK) for _, s in seqs)
    kv_bytes = 2 * blocks * BLOCK * KV_HEADS * HEAD * cache_dtype.itemsize
    return attention_workload(seqs, HEAD, cache_dtype, BLOCK, gen), kv_bytes


def copy_bandwidth(repeats) -> float:
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / median_s(lambda: dst.copy_(src), repeats)


def write_bandwidth(tokens, cache_dtype, gen, repeats) -> float:
    num_blocks = math.ceil(tokens / BLOCK)
    kc, vc = random_cache(num_blocks, cache_dtype, gen), random_cache(num_blocks, cache_dtype, gen)
    k = torch.randn(tokens, KV_HEADS, HEAD, device="cuda", generator=gen).bfloat16()
    v = torch.randn_like(k)
    slots = torch.randperm(num_blocks * BLOCK, device="cuda", generator=gen)[:tokens]
    one = torch.ones(1, device="cuda")
    scales = (one, one) if cache_dtype in reference.FP8_DTYPES else (None, None)
    t = median_s(lambda: pk.reshape_and_cache(k, v, kc, vc, slots, *scales), repeats)
    moved = 2 * tokens * KV_HEADS * HEAD * (k.element_size() + kc.element_size())
    return moved / t


def with_generic(flag: bool, fn):
    with knobs.override(generic_kernels=flag):
        return fn()


def run(repeats: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    r = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "repeats": repeats}
    r["copy_GBps"] = copy_bandwidth(repeats) / 1e9
    for name, dt in CACHE_DTYPES.items():
        for batch, ctx in DECODE_SHAPES:
            tag = f"{name} {batch}x{ctx}"
            r[f"write_GBps {tag}"] = write_bandwidth(batch * ctx, dt, gen, repeats) / 1e9
            fn, kv_bytes = attention_setup([(1, ctx)] * batch, dt, gen)
            t = median_s(fn, repeats)
            r[f"decode_us {tag}"] = t * 1e6
            r[f"decode_GBps {tag}"] = kv_bytes / t / 1e9
            if name == "bf16" and (batch, ctx) == DECODE_SHAPES[0]:
                r["decode_generic_over_specialized"] = \
                    with_generic(True, lambda: median_s(fn, repeats)) / t
            del fn
            torch.cuda.empty_cache()
    for label, seqs in (("prefill 8192", [(8192, 8192)]),
                        ("prefill 2048 over 6144 cached", [(2048, 8192)])):
        fn, _ = attention_setup(seqs, torch.bfloat16, gen)
        t = median_s(fn, max(3, repeats // 4))
        r[f"{label} tokens/s"] = seqs[0][0] / t
        if label == "prefill 8192":
            r["prefill_generic_over_specialized"] = \
                with_generic(True, lambda: median_s(fn, max(3, repeats // 4))) / t
    return r


def table(r: dict) -> str:
    copy = r["copy_GBps"]
    lines = [f"CUDA kernels on {r['gpu']} (torch {r['torch']}), {HEADS}/{KV_HEADS} heads, head "
             f"{HEAD}, block {BLOCK}, median of {r['repeats']}",
             "",
             "| measure | value | vs copy |",
             "| --- | --- | --- |",
             f"| device copy bandwidth (read + write) | {copy:,.0f} GB/s | 1.00 |"]
    for name in CACHE_DTYPES:
        for batch, ctx in DECODE_SHAPES:
            tag = f"{name} {batch}x{ctx}"
            w, d = r[f"write_GBps {tag}"], r[f"decode_GBps {tag}"]
            lines.append(f"| reshape_and_cache {tag.replace(' ', ', ')} ({batch * ctx} tokens) | "
                         f"{w:,.0f} GB/s | {w / copy:.2f} |")
            lines.append(f"| decode {tag.replace(' ', ', ')} | {d:,.0f} GB/s "
                         f"({r[f'decode_us {tag}']:,.0f} us) | {d / copy:.2f} |")
    for label in ("prefill 8192", "prefill 2048 over 6144 cached"):
        lines.append(f"| {label} (bf16) | {r[f'{label} tokens/s']:,.0f} tokens/s | |")
    lines.append(f"| generic / specialized time, decode bf16 64x4096 | "
                 f"{r['decode_generic_over_specialized']:.2f}x | |")
    lines.append(f"| generic / specialized time, prefill 8192 | "
                 f"{r['prefill_generic_over_specialized']:.2f}x | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="also write the raw numbers to this file")
    parser.add_argument("--write-results", action="store_true",
                        help="replace the CUDA section of benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device (torch.cuda.is_available() is False); nothing to measure")
        return 0
    if not pk.HAS_CUDA_KERNELS:
        print("bench_cuda: torch_pagedkv was built without CUDA kernels; nothing to measure")
        return 0
    from benchmarks import machine
    threads = torch.get_num_threads()
    print(machine.line(threads), f"(host); GPU {torch.cuda.get_device_name()}", flush=True)
    r = run(args.repeats)
    r["machine"] = machine.as_dict(threads)
    text = f"Host: {machine.line(threads)}\n\n" + table(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    if args.write_results:
        from benchmarks.results_file import write_section
        write_section(f"CUDA kernels ({r['gpu']})",
                      text + "\n\nCommand: `python -m benchmarks.bench_cuda --write-results`")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
