"""Cascade (shared-prefix) attention on this machine (CPU): one decode step, plain vs cascade.

(a) case study 1's shape: 64 sequences sharing a 512-token prefix, 100-200 tokens of
their own, 32/8 heads, head 128, block 16, bfloat16 and float32: paged_attention over
the whole sequences vs the layer's cascade_attention (prefix pass, suffix pass, merge)
on the StepPlanner's metadata; (b) the same with the 64 sequences in three prefix groups
(three different 512-token prefixes); (sweep) group size x shared prefix length, to
find where cascade starts to pay (AUTO_CASCADE in cache/step_plan.py cites it);
(c) `pagedkv demo`'s decode-phase tokens/s without prefix caching, with it, and with
it plus cascade (the demo's own table, run here with a longer decode phase).
Every variant is timed in interleaved rounds; ratios are of per-round medians.

    python -m benchmarks.bench_cascade [--rounds N] [--repeats N] [--threads T] [--no-sweep]
                                       [--no-demo] [--demo-max-tokens N] [--json]
                                       [--write-results]
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time

import torch

from benchmarks import machine
from benchmarks.results_file import write_section
from torch_pagedkv import ops
from torch_pagedkv.cache import StepPlanner
from torch_pagedkv.cache.step_plan import ALWAYS_CASCADE
from torch_pagedkv.layers.attention import cascade_attention

SEQS, PREFIX, OWN_MIN, OWN_MAX, HEADS, KV_HEADS, HEAD, BLOCK = 64, 512, 100, 200, 32, 8, 128, 16


def decode_step(group_sizes, prefix, own_tokens, dtype, seed=0):
    """A decode step: len(own_tokens) sequences, the first sum(group_sizes) in groups that
    each share `prefix` tokens of full blocks (the others share nothing), physical blocks
    scattered at random. Returns the inputs of both variants and the K/V bytes each reads."""
    gen = torch.Generator().manual_seed(seed)
    pb = prefix // BLOCK
    groups = [g for g, n in enumerate(group_sizes) for _ in range(n)]
    groups += [None] * (len(own_tokens) - len(groups))
    need = pb * len(group_sizes) + sum(-(-n // BLOCK) if g is not None else -(-(prefix + n) // BLOCK)
                                       for g, n in zip(groups, own_tokens))
    perm = torch.randperm(need + 1, generator=gen).tolist()
    prefixes = [perm[g * pb:(g + 1) * pb] for g in range(len(group_sizes))]
    nxt = pb * len(group_sizes)
    rows = []
    for g, n in zip(groups, own_tokens):
        own = -(-n // BLOCK) if g is not None else -(-(prefix + n) // BLOCK)
        ids = (prefixes[g] if g is not None else []) + perm[nxt:nxt + own]
        nxt += own
        rows.append((ids, prefix + n - 1, 1))  # decode: the last token is the query
    # The same step without sharing (no prefix caching): every grouped row's prefix in
    # blocks of its own, after the shared ones.
    unshared = []
    for (ids, computed, new), g in zip(rows, groups):
        if g is not None:
            ids = list(range(nxt, nxt + pb)) + ids[pb:]
            nxt += pb
        unshared.append((ids, computed, new))
    width = max(len(ids) for ids, _, _ in rows)
    planners = {kind: StepPlanner(BLOCK, max_num_seqs=len(rows) + 1, max_num_tokens=len(rows),
                                  max_blocks_per_seq=width, cascade=rule)
                for kind, rule in (("plain", None), ("cascade", ALWAYS_CASCADE))}
    kc = torch.randn(nxt + 1, BLOCK, KV_HEADS, HEAD, generator=gen).to(dtype)
    vc = torch.randn(nxt + 1, BLOCK, KV_HEADS, HEAD, generator=gen).to(dtype)
    q = torch.randn(len(rows), HEADS, HEAD, generator=gen).to(dtype)
    row_bytes = 2 * KV_HEADS * HEAD * kc.element_size()  # K and V of one token
    plain_bytes = sum(prefix + n for n in own_tokens) * row_bytes
    cascade_bytes = (prefix * len(group_sizes) + sum(n if g is not None else prefix + n
                                                     for g, n in zip(groups, own_tokens))) * row_bytes
    return dict(rows=rows, unshared=unshared, planners=planners, q=q, kc=kc, vc=vc,
                plain_bytes=plain_bytes, cascade_bytes=cascade_bytes)


def variants(step, scale):
    """Timed callables: plain and cascade attention, plain attention without prefix
    sharing, the cascade's two passes on their own, and the host planning of the step
    with and without cascade."""
    q, kc, vc = step["q"], step["kc"], step["vc"]
    unshared = StepPlanner(BLOCK, max_num_seqs=len(step["rows"]) + 1,
                           max_num_tokens=len(step["rows"]),
                           max_blocks_per_seq=max(len(r[0]) for r in step["unshared"])
                           ).plan(step["unshared"])
    plain_meta = step["planners"]["plain"].plan(step["rows"])
    cascade_meta = step["planners"]["cascade"].plan(step["rows"])
    c = cascade_meta.cascade
    assert c is not None
    qc = q.index_select(0, c.query_order)
    want = ops.paged_attention(q, kc, vc, plain_meta.block_table, plain_meta.seq_lens,
                               plain_meta.query_start_loc, scale)
    got = cascade_attention(q, kc, vc, c, scale=scale)
    err = (got.float() - want.float()).abs().max().item()
    return err, {
        "plain": lambda: ops.paged_attention(q, kc, vc, plain_meta.block_table,
                                             plain_meta.seq_lens, plain_meta.query_start_loc,
                                             scale),
        "cascade": lambda: cascade_attention(q, kc, vc, c, scale=scale),
        "plain, not shared": lambda: ops.paged_attention(q, kc, vc, unshared.block_table,
                                                         unshared.seq_lens,
                                                         unshared.query_start_loc, scale),
        "prefix pass": lambda: ops.paged_attention_lse(
            qc, kc, vc, c.prefix_block_table, c.prefix_seq_lens, c.prefix_query_start_loc,
            scale, causal=False),
        "suffix pass": lambda: ops.paged_attention_lse(
            qc, kc, vc, c.suffix_block_table, c.suffix_seq_lens, c.suffix_query_start_loc,
            scale),
        "plan (host)": lambda: step["planners"]["plain"].plan(step["rows"]),
        "plan with cascade (host)": lambda: step["planners"]["cascade"].plan(step["rows"]),
    }


def interleaved(fns: dict, rounds: int) -> dict:
    """Median seconds per variant; each round runs every variant once, the order rotating."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def own_tokens(n, seed):
    rng = random.Random(seed)
    return [rng.randint(OWN_MIN, OWN_MAX) for _ in range(n)]


def case(name, group_sizes, dtype, rounds, repeats):
    """The case timed `repeats` times (interleaved rounds each); the run with the median
    speedup, and the range of all."""
    step = decode_step(group_sizes, PREFIX, own_tokens(SEQS, 1), dtype)
    err, fns = variants(step, 1.0 / math.sqrt(HEAD))
    runs = sorted((interleaved(fns, rounds) for _ in range(repeats)),
                  key=lambda t: t["plain"] / t["cascade"])
    t = runs[len(runs) // 2]
    return dict(case=name, dtype=str(dtype).removeprefix("torch."), groups=len(group_sizes),
                max_abs_err=err, ms={k: v * 1e3 for k, v in t.items()},
                speedup=t["plain"] / t["cascade"],
                speedup_range=[r["plain"] / r["cascade"] for r in (runs[0], runs[-1])],
                bytes_bound=step["plain_bytes"] / step["cascade_bytes"],
                plain_gbps=step["plain_bytes"] / t["plain"] / 1e9)


def cases(threads, args) -> list[dict]:
    """(a) and (b) in both dtypes at `threads` threads, printed as they finish."""
    torch.set_num_threads(threads)
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        for name, groups in (("(a) one group", [SEQS]), ("(b) three groups", [22, 21, 21])):
            r = dict(case(name, groups, dtype, args.rounds, args.repeats), threads=threads)
            out.append(r)
            print(f"{threads}t {r['case']:18} {r['dtype']:9} plain {r['ms']['plain']:7.2f} ms  "
                  f"cascade {r['ms']['cascade']:7.2f} ms  speedup {r['speedup']:.2f}x "
                  f"[{r['speedup_range'][0]:.2f}-{r['speedup_range'][1]:.2f}] (bytes bound "
                  f"{r['bytes_bound']:.2f}x)  prefix {r['ms']['prefix pass']:.2f} ms  suffix "
                  f"{r['ms']['suffix pass']:.2f} ms  not shared "
                  f"{r['ms']['plain, not shared']:.2f} ms", flush=True)
    return out


def sweep(dtype, rounds, sizes=(4, 8, 16, 32, 64), prefixes=(64, 128, 256, 512, 1024)):
    """Cascade speedup for a batch of `size` sequences sharing `prefix` tokens."""
    out = {}
    for size in sizes:
        for prefix in prefixes:
            step = decode_step([size], prefix, own_tokens(size, size), dtype, seed=size + prefix)
            _, fns = variants(step, 1.0 / math.sqrt(HEAD))
            t = interleaved({k: fns[k] for k in ("plain", "cascade")}, rounds)
            out[(size, prefix)] = t["plain"] / t["cascade"]
    return out


NOTES = """How to read it. Cascade removes the prefix's re-reads, not its arithmetic: every
(query, key) pair is still scored and weighed. On this CPU the plain kernel does not
re-read the shared prefix from DRAM either: 512 tokens of K/V over 8 kv heads are 2 MiB
per layer in bf16, and the 64 sequences find them in the 32 MiB L3, so plain's prefix part
is compute-bound. (`plain, not shared` is the same step with every prefix in blocks of its
own, as without prefix caching: that variant pays the bytes.) So the bytes bound (K/V
bytes plain reads / bytes cascade reads) does not bound the speedup here; what does is
plain's arithmetic rate on the prefix (decode tiles of 4 query vectors per kv head, L3
reads) against the prefix pass's (one matrix tile per kv head of every row of the group
times its GQA heads, each K/V row packed once; bf16 through vdpbf16ps), while the suffix
pass streams each sequence's own blocks from DRAM as plain does. Below 16 sequences or
256 shared tokens the fixed costs (two passes, two row gathers, the merge) win: that is
AUTO_CASCADE (cache/step_plan.py). In the demo model a decode step is mostly matmuls
(hidden 512, 4 layers); attention is about a quarter of it."""


def run_demo(max_tokens: int) -> dict:
    """`pagedkv demo --max-tokens N` (its table printed as usual); its JSON numbers."""
    import os
    import tempfile

    from torch_pagedkv.programs import demo
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "demo.json")
        saved = torch.get_num_threads()
        try:
            demo.main(["--quiet", "--max-tokens", str(max_tokens), "--json", path])
        finally:
            torch.set_num_threads(saved)
        with open(path) as f:
            return json.load(f)


def markdown(results, sweeps, demo, args, load) -> str:
    lines = [
        f"Command: `python -m benchmarks.bench_cascade --rounds {args.rounds} --repeats "
        f"{args.repeats} --sweep-rounds "
        f"{args.sweep_rounds} --threads {args.threads} --demo-max-tokens "
        f"{args.demo_max_tokens} --write-results`",
        "",
        f"{machine.line(args.threads)} (and 1 thread); 1-minute load "
        f"average {load[0]:.1f} at the start, {load[1]:.1f} at the end (other developers' "
        "builds share the machine). One decode step: "
        f"{SEQS} sequences, each {OWN_MIN}-{OWN_MAX} tokens of its own after a "
        f"{PREFIX}-token shared prefix, {HEADS}/{KV_HEADS} heads, head {HEAD}, block {BLOCK}; "
        "median ms of interleaved rounds. `plain`: paged_attention over the whole "
        "sequences; `cascade`: the layer's cascade_attention (query gather, prefix pass, "
        "suffix pass, merge, restore) on the StepPlanner's metadata; the two passes also "
        "alone. Bytes bound: K/V bytes plain reads / bytes cascade reads. Each case is timed "
        f"{args.repeats} times ({args.rounds} interleaved rounds each): the run with the "
        "median speedup, and in brackets the range of all runs.",
        "",
        "| case | dtype | threads | plain ms | cascade ms | **speedup** [range] | bytes bound "
        "| prefix pass ms | suffix pass ms | plain, not shared ms | plain GB/s | max abs err "
        "| plan µs plain / cascade |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ms = r["ms"]
        lines.append(
            f"| {r['case']} | {r['dtype']} | {r['threads']} | {ms['plain']:.2f} | {ms['cascade']:.2f} | "
            f"**{r['speedup']:.2f}x** [{r['speedup_range'][0]:.2f}-{r['speedup_range'][1]:.2f}] | "
            f"{r['bytes_bound']:.2f}x | {ms['prefix pass']:.2f} | "
            f"{ms['suffix pass']:.2f} | {ms['plain, not shared']:.2f} | {r['plain_gbps']:.1f} | "
            f"{r['max_abs_err']:.1e} | "
            f"{ms['plan (host)'] * 1e3:.0f} / {ms['plan with cascade (host)'] * 1e3:.0f} |")
    for dtype, table in sweeps.items():
        sizes = sorted({s for s, _ in table})
        prefixes = sorted({p for _, p in table})
        lines += ["", f"Threshold sweep, {dtype}: cascade speedup (plain ms / cascade ms) for a "
                  "decode batch of N sequences sharing P tokens (each with "
                  f"{OWN_MIN}-{OWN_MAX} of its own).", "",
                  "| N \\ P | " + " | ".join(str(p) for p in prefixes) + " |",
                  "|---|" + "---:|" * len(prefixes)]
        for s in sizes:
            lines.append(f"| {s} | " + " | ".join(f"{table[(s, p)]:.2f}" for p in prefixes) + " |")
    if demo:
        names = ("off", "on", "cascade")
        lines += [
            "", f"(c) `pagedkv demo --max-tokens {args.demo_max_tokens}` (case study 1 through "
            "the engine: demo model, float32, 1 thread as the demo runs; engines stepped in "
            "turns). Decode throughput counts the steps that computed no prompt token.", "",
            "| | no prefix cache | prefix cache | prefix cache + cascade |",
            "|---|---:|---:|---:|",
            "| decode throughput (decode-only steps) | " + " | ".join(
                f"{demo[n]['decode_tok_s']:,.0f} tok/s" for n in names) + " |",
            "| prefill wall time | " + " | ".join(
                f"{demo[n]['prefill_time_s']:.2f} s" for n in names) + " |",
            "| steps with cascade attention | " + " | ".join(
                f"{demo[n]['cascade_steps']} of {demo[n]['steps']}" for n in names) + " |",
            "", f"Cascade decode **{demo['decode_speedup_cascade']:.2f}x** the prefix-cached "
            f"engine's; outputs identical in all runs: {demo['outputs_identical']}."]
    return "\n".join(lines) + "\n\n" + NOTES


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--repeats", type=int, default=5,
                   help="timed runs per case (a), (b); the median one is reported")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sweep-rounds", type=int, default=7)
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--no-demo", action="store_true")
    p.add_argument("--demo-max-tokens", type=int, default=32)
    p.add_argument("--json", action="store_true")
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine.line(args.threads), flush=True)
    load0 = _load()
    # Also one thread: a neighbour's busy core stalls every parallel region of a 2-thread
    # run on a shared machine, while a 1-thread run keeps its own core.
    results = []
    for threads in sorted({args.threads, 1}, reverse=True):
        results += cases(threads, args)
    torch.set_num_threads(args.threads)
    sweeps = {}
    if not args.no_sweep:
        for dtype in (torch.bfloat16, torch.float32):
            name = str(dtype).removeprefix("torch.")
            sweeps[name] = sweep(dtype, args.sweep_rounds)
            print(f"sweep {name}: " + ", ".join(f"N={s} P={pr}: {v:.2f}x"
                                                for (s, pr), v in sweeps[name].items()),
                  flush=True)
    demo = None if args.no_demo else run_demo(args.demo_max_tokens)
    load1 = _load()
    if args.json:
        print(json.dumps(dict(machine=machine.as_dict(args.threads), results=results, demo=demo,
                              sweeps={k: {f"{s}x{pr}": v for (s, pr), v in t.items()}
                                      for k, t in sweeps.items()}), indent=2))
    if args.write_results:
        write_section("Cascade attention", markdown(results, sweeps, demo, args, (load0, load1)))
    return 0


def _load() -> float:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return float("nan")


if __name__ == "__main__":
    sys.exit(main())
