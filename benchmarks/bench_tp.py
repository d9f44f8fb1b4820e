"""Tensor parallelism on this machine: N=1 vs N=2 tokens/s, and what the collectives cost.

A TinyLlama wide enough that matmuls dominate (hidden 2048, MLP 5632, 32 heads of 64,
8 KV heads, 4 layers, vocabulary 32,000, float32, eager), one workload: 8 prompts of
`--prompt` tokens, `--new` greedy tokens each, through the engine step by step.
Variants, run in interleaved rounds (medians reported):
  N=1 at 1 thread, N=1 at 2 threads (all of this 2-core machine),
  N=2 with 1 thread per rank (gloo on loopback), lm_head split by vocabulary (default),
  N=2 the same with the lm_head replicated (PAGEDKV_TP_LM_HEAD=replicated).
Rank 0 (this process) times its torch.distributed collectives (all-reduce of the
row-parallel layers, all-gather of the split lm_head): what a step spends in them, its
waits for the other rank included. Also measured: the lm_head's share of an N=1 decode
step, and a bare all-reduce of one decode step's hidden states between the two ranks.

    python -m benchmarks.bench_tp [--rounds 3] [--prompt 32] [--new 32] [--write-results]
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from torch_pagedkv.engine import LLM, SamplingParams
from torch_pagedkv.models import LlamaConfig, TinyLlama

CFG = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=4,
                  num_heads=32, num_kv_heads=8, head_size=64, max_position=1024, seed=0)
BATCH = 8
ENGINE = dict(num_blocks=256, block_size=16, compile=False, enable_prefix_caching=False)


class CollectiveTimer:
    """Wraps dist.all_reduce and the all-gather in this process with a wall-clock sum."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        from torch_pagedkv.distributed import sharding
        self._patch = [(dist, "all_reduce"), (sharding, "all_gather")]
        self._orig = [getattr(m, n) for m, n in self._patch]
        for (module, name), fn in zip(self._patch, self._orig):
            setattr(module, name, self._timed(fn))

    def _timed(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1
        return timed


@contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(llm: LLM, prompts: list[list[int]], new: int, timer: CollectiveTimer) -> dict:
    """One workload through llm, stepped here: wall time, decode steps' times and their
    collective time; the tokens."""
    reqs = [llm.add_request(p, SamplingParams(max_tokens=new)) for p in prompts]
    decode_s, decode_coll_s, steps, calls = [], [], 0, 0
    t0 = time.perf_counter()
    while llm.has_unfinished():
        c0, n0, s0 = timer.seconds, timer.calls, time.perf_counter()
        step = llm.step()
        if step.scheduled.num_prefill_tokens == 0:
            decode_s.append(time.perf_counter() - s0)
            decode_coll_s.append(timer.seconds - c0)
            calls = timer.calls - n0
        steps += 1
    wall = time.perf_counter() - t0
    return dict(tok_s=len(prompts) * new / wall, decode_ms=statistics.median(decode_s) * 1e3,
                coll_ms=statistics.median(decode_coll_s) * 1e3, calls=calls,
                tokens=[llm.output(r).token_ids for r in reqs])


def lm_head_share(model: TinyLlama, n: int) -> float:
    """Seconds of the lm_head on n rows (what a decode step of n sequences computes)."""
    x = torch.randn(n, CFG.hidden_size)
    with torch.inference_mode():
        model.compute_logits(x)
        t0 = time.perf_counter()
        for _ in range(10):
            model.compute_logits(x)
    return (time.perf_counter() - t0) / 10


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_tp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt", type=int, default=32, help="tokens per prompt")
    p.add_argument("--new", type=int, default=32, help="generated tokens per prompt")
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args(argv)
    from benchmarks import machine
    print(machine.line(1), "(N=1 also at 2 threads; each N=2 rank at 1)", flush=True)
    load_start = os.getloadavg()[0]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(CFG.vocab_size, (args.prompt,), generator=g).tolist()
               for _ in range(BATCH)]
    build = functools.partial(TinyLlama, CFG)
    timer = CollectiveTimer()
    single = LLM(build, **ENGINE)
    results: dict[str, list[dict]] = {"N=1, 1 thread": [], "N=1, 2 threads": []}
    # One tensor-parallel engine per process at a time: a phase per lm_head mode, each
    # interleaving its rounds with the N=1 variants.
    for mode, name in (("vocab", "N=2, lm_head split by vocab"),
                       ("replicated", "N=2, lm_head replicated")):
        os.environ["PAGEDKV_TP_LM_HEAD"] = mode
        t0 = time.perf_counter()
        with threads(1):
            tp = LLM(build, tensor_parallel_size=2, **ENGINE)
        print(f"{name}: engine built in {time.perf_counter() - t0:.0f} s")
        variants = {"N=1, 1 thread": (single, 1), "N=1, 2 threads": (single, 2), name: (tp, 1)}
        results[name] = []
        for llm, n in variants.values():  # warm-up
            with threads(n):
                run(llm, prompts[:2], 2, timer)
        for r in range(args.rounds):
            for key, (llm, n) in variants.items():
                with threads(n):
                    results[key].append(run(llm, prompts, args.new, timer))
            print(f"round {r + 1}/{args.rounds} done")
        tp.shutdown()
    del os.environ["PAGEDKV_TP_LM_HEAD"]
    with threads(1):
        head_s = lm_head_share(single.model, BATCH)
    same = all(res["tokens"] == results["N=1, 1 thread"][0]["tokens"]
               for rs in results.values() for res in rs)
    bare = bare_all_reduce_ms()

    base = statistics.median(r["tok_s"] for r in results["N=1, 1 thread"])
    lines = [f"{machine.line(1)} (N=1 also at 2 threads; each N=2 rank at 1).", "",
             f"TinyLlama: hidden {CFG.hidden_size}, MLP {CFG.intermediate_size}, "
             f"{CFG.num_heads} heads x {CFG.head_size} ({CFG.num_kv_heads} KV heads), "
             f"{CFG.num_layers} layers, vocabulary {CFG.vocab_size:,}, float32, eager; "
             f"{BATCH} prompts of {args.prompt} tokens, {args.new} greedy tokens each; "
             f"median of {args.rounds} interleaved rounds per N=2 variant (the N=1 ones "
             f"run in both phases: {2 * args.rounds} rounds); 1-minute load average "
             f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (other "
             "developers' jobs share the 2 cores).",
             "",
             "| variant | tokens/s | vs N=1, 1 thread | decode step ms | collectives ms "
             "per decode step (rank 0) | collective calls per step |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, rs in results.items():
        tok = statistics.median(r["tok_s"] for r in rs)
        step = statistics.median(r["decode_ms"] for r in rs)
        coll = statistics.median(r["coll_ms"] for r in rs)
        calls = rs[0]["calls"] if name.startswith("N=2") else 0
        lines.append(f"| {name} | {tok:,.1f} | {tok / base:.2f}x | {step:.1f} | "
                     f"{coll:.1f} | {calls} |")
    one_step = statistics.median(r["decode_ms"] for r in results["N=1, 1 thread"])
    lines += ["",
              f"Greedy tokens identical in every variant and round: {same}. The lm_head on "
              f"{BATCH} rows takes {head_s * 1e3:.1f} ms at 1 thread, "
              f"{head_s * 1e3 / one_step:.0%} of an N=1 decode step. A bare all-reduce of "
              f"one decode step's hidden states ([{BATCH}, {CFG.hidden_size}] float32) "
              f"between two processes here: {bare:.2f} ms (median of 200)."]
    text = "\n".join(lines)
    print(text)
    if args.write_results:
        from benchmarks.results_file import write_section
        command = (f"python -m benchmarks.bench_tp --rounds {args.rounds} --prompt "
                   f"{args.prompt} --new {args.new} --write-results")
        write_section("Tensor parallelism", f"Command: `{command}`\n\n{text}\n\n{READING}")
    return 0


READING = """How to read it. Each rank reads half of every layer's weights, so a step's
matmuls halve; what it adds is two all-reduces per layer (and one all-gather for a split
lm_head), each a loopback round trip through gloo, and the step plan's two broadcasts.
This machine's 2 vCPUs give about one core of matmul throughput (BUILD.md: two threads
give no matmul speedup over one, and an OpenMP region stalls when a neighbour's job holds
the other vCPU, which is what the N=1 2-thread row shows), so two ranks of one thread
each share what one thread at N=1 has: no speedup is to be had here. The collectives'
time on rank 0 is mostly waiting for rank 1 to reach the same all-reduce (the bare
all-reduce costs a fraction of a millisecond, times 8 or 9 calls a step): the two ranks
take turns on the shared core instead of running at once. Splitting the lm_head by
vocabulary costs one all-gather and halves the lm_head's matmul (a large part of a step
at this depth and vocabulary), which is why it is the default. The test of the code here
is the tokens, identical to N=1's in every run.

On 8 GPUs with NCCL the balance is another one. Each GPU holds 1/8 of the weights and
of the KV cache (a 70B model in bf16 fits 8 x 80 GB, not one), and decode is bound by
reading weights, so a step's weight reads per GPU drop 8x while the GPUs read in
parallel. An all-reduce of a decode step's hidden states is a few KB to a few MB over
NVLink, latency-bound at these sizes (microseconds per call, not the ~0.5 ms of gloo on
loopback here), 2 per layer: with 80 layers 160 calls per step, which a CUDA graph can
capture with the rest of the decode step so the host issues none of them one by one
(vLLM does; here `cuda_graphs=True` tries it, untested, and N > 1 runs without graphs
by default). The cost
that grows with N is that latency times the layer count, against weight reads that
shrink as 1/N: the reason TP stays within a node (NVLink) and pipeline parallelism is
used across nodes. What stays on rank 0 here, the scheduler, the plan broadcast over
gloo and sampling, is host work of the order of the step's planning, done while the
GPUs run the previous step's kernels only once the engine overlaps them (it does not
yet: one step at a time). Not measured: no GPU and no second machine were available."""


def _bare_rank(rank: int, port: int, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    x = torch.randn(BATCH, CFG.hidden_size)
    times = []
    for i in range(220):
        t0 = time.perf_counter()
        dist.all_reduce(x)
        if i >= 20:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        out.put(statistics.median(times) * 1e3)
    dist.destroy_process_group()


def bare_all_reduce_ms() -> float:
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_bare_rank, args=(r, port, out)) for r in range(2)]
    for proc in procs:
        proc.start()
    ms = out.get(timeout=120)
    for proc in procs:
        proc.join()
    return ms


if __name__ == "__main__":
    raise SystemExit(main())
