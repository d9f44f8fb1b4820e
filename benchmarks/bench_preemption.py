"""What resuming a preempted sequence costs: swap (copy its K/V out and back) vs
recompute (prefill its whole context again).

The demo model (programs/demo.py: tiny Llama, 4 layers, hidden 512, 2 KV heads of 64,
float32, compiled) and the engine's own pieces: recompute is the engine prefilling a
context of N tokens (LLM.generate of one N-token prompt, prefix caching off, chunks of
2,048 tokens: what readmitting a recompute-preempted sequence costs), swap is the
engine's SwapSpace copying the sequence's ceil(N / 16) blocks out to the swap space and
back into other cache blocks with swap_blocks (what preemption_mode="swap" pays instead).
Contexts 512, 2,048 and 8,192; rounds interleave the contexts and both methods, so the
machine's drift hits all alike; medians are reported.

    python -m benchmarks.bench_preemption [--rounds 3] [--write-results]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import torch

from torch_pagedkv.engine import LLM, SamplingParams
from torch_pagedkv.programs.demo import DEMO_CONFIG
from torch_pagedkv.engine.swap import SwapSpace
from torch_pagedkv.models.llama import TinyLlama

CONTEXTS = (512, 2048, 8192)
BLOCK = 16
CHUNK = 2048  # the engine's default max_num_batched_tokens


def recompute_s(llm: LLM, prompt: list[int]) -> float:
    """One prefill of the whole context, through the engine (and one sampled token)."""
    t0 = time.perf_counter()
    llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)
    return time.perf_counter() - t0


def swap_s(swap: SwapSpace, num_blocks: int) -> tuple[float, float]:
    """(swap-out, swap-in) seconds for a sequence of num_blocks blocks: cache blocks
    [0, n) out to the swap space, then back into cache blocks [n, 2n)."""
    held = swap.allocate(num_blocks)
    t0 = time.perf_counter()
    swap.swap_out(list(zip(range(num_blocks), held)))
    t1 = time.perf_counter()
    swap.swap_in(list(zip(held, range(num_blocks, 2 * num_blocks))))
    t2 = time.perf_counter()
    swap.free(held)
    return t1 - t0, t2 - t1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_preemption", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1, as `pagedkv demo`: steadier on a shared machine)")
    p.add_argument("--no-compile", action="store_true", help="run the model eagerly")
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from benchmarks import machine
    print(machine.line(args.threads), flush=True)
    load_start = os.getloadavg()[0]
    cfg = dataclasses.replace(DEMO_CONFIG, max_position=max(CONTEXTS) + BLOCK)
    model = TinyLlama(cfg)
    blocks = 2 * -(-max(CONTEXTS) // BLOCK) + 8  # room for a context and its swapped-in copy
    llm = LLM(model, num_blocks=blocks, block_size=BLOCK, enable_prefix_caching=False,
              max_num_batched_tokens=CHUNK, compile=not args.no_compile)
    swap = SwapSpace(llm.kv_cache, num_blocks=blocks // 2)
    g = torch.Generator().manual_seed(0)
    prompts = {n: torch.randint(cfg.vocab_size, (n,), generator=g).tolist() for n in CONTEXTS}
    t0 = time.perf_counter()
    recompute_s(llm, prompts[CONTEXTS[0]][:100])  # compile and warm up
    swap_s(swap, 4)
    print(f"warm-up (compile): {time.perf_counter() - t0:.1f} s")

    times: dict[int, dict[str, list[float]]] = {n: {"out": [], "in": [], "recompute": []}
                                                for n in CONTEXTS}
    for r in range(args.rounds):
        for n in CONTEXTS:
            out_s, in_s = swap_s(swap, -(-n // BLOCK))
            times[n]["out"].append(out_s)
            times[n]["in"].append(in_s)
            times[n]["recompute"].append(recompute_s(llm, prompts[n]))
        print(f"round {r + 1}/{args.rounds} done")

    kv = llm.kv_cache
    mode = "eager" if args.no_compile else "compiled"
    lines = [machine.line(args.threads), "", f"Demo model (tiny Llama, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
             f"{cfg.num_kv_heads} KV heads x {cfg.head_size}, float32, {mode}), KV blocks of "
             f"{BLOCK} tokens ({kv.block_bytes // 1024} KiB per block, all layers), "
             f"device {kv.device}, swap space pinned: "
             f"{swap.key_caches[0].is_pinned()}; median of {args.rounds} interleaved rounds; "
             f"1-minute load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} "
             "at the end (other developers' jobs share the machine).",
             "",
             "| context | K/V MiB | swap-out ms | swap-in ms | swap total ms | recompute ms "
             "| recompute / swap |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for n in CONTEXTS:
        med = {k: statistics.median(v) for k, v in times[n].items()}
        total = med["out"] + med["in"]
        mib = -(-n // BLOCK) * kv.block_bytes / 2**20
        lines.append(f"| {n:,} | {mib:.0f} | {med['out'] * 1e3:.2f} | {med['in'] * 1e3:.2f} | "
                     f"{total * 1e3:.2f} | {med['recompute'] * 1e3:,.0f} | "
                     f"{med['recompute'] / total:,.0f}x |")
    text = "\n".join(lines)
    print(text)
    if args.write_results:
        from benchmarks.results_file import write_section
        command = f"python -m benchmarks.bench_preemption --rounds {args.rounds}" + \
            (" --no-compile" if args.no_compile else "") + " --write-results"
        write_section("Preemption: swap vs recompute", f"Command: `{command}`\n\n{text}\n\n"
                      "Per preempted sequence of the given context: swap-out + swap-in is "
                      "what preemption_mode=\"swap\" pays (two copies of its K/V through "
                      "swap_blocks), recompute is the prefill preemption_mode=\"recompute\" "
                      "pays on readmission. Recompute grows faster than linearly with the "
                      "context (attention), the copies linearly. On a GPU the copies cross "
                      "PCIe to and from pinned memory (DMA) and the prefill runs at GPU "
                      "speed, so the ratio there is another one: not measured here (no GPU).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
