"""Host time of one engine decode step, phase by phase.

A 32-layer tiny Llama (hidden 256, 4/2 heads, head 64) decodes a batch of 64 sequences
with short contexts, so the kernels' own work is small and the step's host work shows:
scheduling, planning the metadata, the model forward (per layer: projections, rotary,
write_and_attend), sampling with its one device sync, and the scheduler's update. The
pagedkv ops' share of the forward is read from torch.profiler (self CPU time per op).

Phases are timed inside one process over many steps; medians per phase are reported
(this machine's speed drifts, so compare ratios within one run).

    python -m benchmarks.bench_step [--steps N] [--compile] [--write-results]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from torch_pagedkv.engine import LLM, SamplingParams
from torch_pagedkv.models.llama import LlamaConfig, TinyLlama

CONFIG = LlamaConfig(num_layers=32, hidden_size=256, intermediate_size=512, num_heads=4,
                     num_kv_heads=2, head_size=64, vocab_size=4096)
PHASES = ("schedule", "plan", "forward+sample", "sync", "update")


def make_engine(batch: int, prompt_len: int, compile: bool) -> LLM:
    model = TinyLlama(CONFIG)
    llm = LLM(model, num_blocks=batch * 16 + 64, block_size=16, max_num_seqs=batch,
              max_num_batched_tokens=max(2048, batch * prompt_len), compile=compile)
    g = torch.Generator().manual_seed(0)
    for _ in range(batch):
        prompt = torch.randint(CONFIG.vocab_size, (prompt_len,), generator=g).tolist()
        llm.add_request(prompt, SamplingParams(max_tokens=10_000))  # no stop tokens
    llm.step()  # the prefill: every sequence decodes from here on
    return llm


def time_steps(llm: LLM, steps: int) -> dict[str, list[float]]:
    """Per-phase seconds of `steps` decode steps (the engine's step(), taken apart)."""
    sched, runner = llm.scheduler, llm.runner
    planner_plan = runner.planner.plan
    times: dict[str, list[float]] = {p: [] for p in PHASES}
    plan_s = [0.0]

    def timed_plan(*a, **k):
        t = time.perf_counter()
        try:
            return planner_plan(*a, **k)
        finally:
            plan_s[0] += time.perf_counter() - t

    runner.planner.plan = timed_plan
    try:
        for _ in range(steps):
            plan_s[0] = 0.0
            t0 = time.perf_counter()
            out = sched.schedule()
            t1 = time.perf_counter()
            sampled = runner.execute(out)
            t2 = time.perf_counter()
            tokens = sampled.tolist()
            t3 = time.perf_counter()
            sched.update(out, tokens, t3)
            t4 = time.perf_counter()
            times["schedule"].append(t1 - t0)
            times["plan"].append(plan_s[0])
            times["forward+sample"].append(t2 - t1 - plan_s[0])
            times["sync"].append(t3 - t2)
            times["update"].append(t4 - t3)
    finally:
        runner.planner.plan = planner_plan
    return times


def op_share(llm: LLM, steps: int) -> dict[str, float]:
    """Self CPU seconds per step of the pagedkv ops, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        time_steps(llm, steps)
    per_op: dict[str, float] = {}
    for e in prof.key_averages():
        if e.key.startswith("pagedkv::"):
            per_op[e.key] = e.self_cpu_time_total / 1e6 / steps
    return per_op


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="the compiled model (default eager)")
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from benchmarks import machine
    print(machine.line(args.threads), flush=True)
    llm = make_engine(args.batch, args.prompt_len, args.compile)
    time_steps(llm, 3)  # warm-up (and compile)
    times = time_steps(llm, args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    total = sum(med.values())
    ops = op_share(llm, max(3, args.steps // 3))
    mode = "compiled" if args.compile else "eager"
    lines = [machine.line(args.threads), "", f"decode step, {CONFIG.num_layers} layers, batch {args.batch}, contexts "
             f"~{args.prompt_len}+ tokens, {mode}: "
             f"median per phase over {args.steps} steps",
             "", "| phase | ms | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {v * 1e3:.2f} | {v / total:.0%} |" for k, v in med.items()]
    lines.append(f"| **step** | **{total * 1e3:.2f}** | |")
    lines += ["", "pagedkv ops inside forward+sample (torch.profiler self CPU per step):", "",
              "| op | ms per step | per layer (us) |", "|---|---:|---:|"]
    lines += [f"| {k} | {v * 1e3:.2f} | {v / CONFIG.num_layers * 1e6:.0f} |"
              for k, v in sorted(ops.items())]
    text = "\n".join(lines)
    print(text)
    if args.write_results:
        from benchmarks.results_file import write_section
        write_section(f"Engine step host time ({mode})",
                      text + f"\n\n`python -m benchmarks.bench_step"
                      f"{' --compile' if args.compile else ''} --write-results`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
