"""`pagedkv demo`: the seed's case study 1, run for real.

A customer-support chatbot: 64 concurrent conversations share a 500-token system
prompt, each followed by a 50-200-token user turn. The same prompts go through the
engine three times on the same compiled model: without prefix caching, with it, and
with it plus cascade attention (the shared prompt's K/V read once per step for all
64 conversations instead of once each). The demo prints what the engine measured:
prompt tokens computed, prefill and decode wall time and throughput, KV blocks
needed to hold the 64 prompts, prefix-cache hit rate, cascade steps, and checks
that all runs produced the same tokens.

`pagedkv demo --tiers` runs the prefix cache's host and disk tiers instead: a second
turn of every conversation with a KV cache too small to keep the first turns, then a
cold restart with and without the disk tier (programs/demo_tiers.py).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch
from tqdm.auto import tqdm

from ..models.llama import LlamaConfig, TinyLlama
from ..engine.llm import LLM
from ..engine.request import RequestOutput
from ..engine.sampling import SamplingParams

# The demo model: small enough that both runs and the compile take about a minute on
# two CPU cores, big enough that prefill cost is dominated by per-token work.
DEMO_CONFIG = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536,
                          num_layers=4, num_heads=8, num_kv_heads=2, head_size=64, seed=0)


def build_workload(conversations: int, system_tokens: int, user_min: int, user_max: int,
                   vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(vocab) for _ in range(system_tokens)]
    return [system + [rng.randrange(vocab) for _ in range(rng.randint(user_min, user_max))]
            for _ in range(conversations)]


def _summarize(llm: LLM, reqs, prompts, block_size: int, decode: list[float]) -> dict:
    st = llm.stats
    outs = [RequestOutput.of(r) for r in reqs]
    # Blocks to hold every prompt at once: each conversation's prompt blocks, minus the
    # ones allocate() handed it from the prefix cache (computed, and counted, once).
    prompt_blocks = sum(-(-len(p) // block_size) for p in prompts)
    kv_blocks = prompt_blocks - sum(o.metrics.num_cached_tokens // block_size for o in outs)
    return {
        "prefill_tokens": st.num_prefill_tokens,
        "prefill_time_s": st.prefill_time_s,
        "decode_time_s": st.decode_time_s,
        # Decode phase: the steps that computed no prompt token (tokens, seconds).
        "decode_tokens": int(decode[0]),
        "decode_tok_s": decode[0] / decode[1] if decode[1] else 0.0,
        "steps": st.num_steps,
        "cascade_steps": st.num_cascade_steps,
        "kv_blocks": kv_blocks,
        "kv_bytes": kv_blocks * llm.kv_cache.block_bytes,
        "peak_blocks_in_use": st.peak_blocks_used,
        "hit_rate": st.hit_rate,
        "cached_prompt_tokens": sum(o.metrics.num_cached_tokens for o in outs),
        "preemptions": st.num_preemptions,
        "compiled_graphs": llm.num_compiled_graphs,
        "tokens": [o.token_ids for o in outs],
    }


# The demo's runs: (name, LLM options). The first takes longest and runs once; the
# others are repeated on fresh engines until it is done (see run_variants_in_turns).
VARIANTS = (
    ("no prefix cache", dict(enable_prefix_caching=False, enable_cascade=False)),
    ("prefix cache", dict(enable_prefix_caching=True, enable_cascade=False)),
    ("prefix cache + cascade", dict(enable_prefix_caching=True, enable_cascade=None)),
)


def run_variants_in_turns(model, prompts, params, args,
                          variants=VARIANTS) -> dict[str, list[dict]]:
    """Run the workload on one engine per variant, one engine step each in turn.

    A shared machine's speed drifts by 2x within minutes; stepping the engines
    alternately makes the drift hit all alike. The first variant (the slowest) runs
    once; every other one that finishes before it is repeated on a fresh engine (an
    empty prefix cache) until it is done, and every completed run is kept.
    """
    def start(options):
        llm = LLM(model, num_blocks=args.num_blocks, block_size=args.block_size,
                  max_num_batched_tokens=args.max_batched_tokens, max_num_seqs=len(prompts),
                  compile=not args.no_compile, **options)
        return [llm, [llm.add_request(p, params) for p in prompts], [0.0, 0.0]]

    runs = {name: [start(options)] for name, options in variants}
    done: dict[str, list[dict]] = {name: [] for name, _ in variants}
    first = variants[0][0]
    with tqdm(total=len(prompts), desc=f"requests ({first})", unit="req",
              disable=args.quiet, dynamic_ncols=True) as bar:
        while runs[first][-1][0].has_unfinished() or not all(done.values()):
            for name, options in variants:
                llm, reqs, decode = runs[name][-1]
                if not llm.has_unfinished():
                    continue
                step = llm.step()
                if step.scheduled.scheduled and not step.scheduled.num_prefill_tokens:
                    decode[0] += step.scheduled.num_decode_tokens
                    decode[1] += step.seconds
                if name == first:
                    bar.update(len(step.finished))
                if not llm.has_unfinished():
                    done[name].append(_summarize(llm, reqs, prompts, args.block_size, decode))
                    if name != first and runs[first][-1][0].has_unfinished():
                        runs[name].append(start(options))
            bar.set_postfix_str("repeats done: " + ", ".join(
                f"{len(v)}" for k, v in done.items() if k != first))
    return done


def run_in_turns(model, prompts, params, args) -> tuple[dict, list[dict]]:
    """Without and with prefix caching (cascade by the engine's default), in turns: the
    uncached run and every prefix-cached run (see run_variants_in_turns)."""
    done = run_variants_in_turns(model, prompts, params, args, variants=(
        ("off", dict(enable_prefix_caching=False)), ("on", dict(enable_prefix_caching=True))))
    return done["off"][0], done["on"]


def _mean_runs(runs: list[dict]) -> dict:
    """The first run's counts with the mean of every run's timings."""
    out = dict(runs[0])
    for key in ("prefill_time_s", "decode_time_s", "decode_tok_s"):
        out[key] = sum(r[key] for r in runs) / len(runs)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pagedkv demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=int, default=64)
    p.add_argument("--system-tokens", type=int, default=500)
    p.add_argument("--user-min", type=int, default=50)
    p.add_argument("--user-max", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=8, help="reply tokens per conversation")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=4096)
    p.add_argument("--max-batched-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compile", action="store_true", help="run the model eagerly")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: on a shared machine a busy core stalls every "
                        "OpenMP region of a 2-thread run; the ratios are the point here)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    p.add_argument("--tiers", action="store_true",
                   help="instead: a second turn per conversation with a KV cache too small "
                        "for the first turns, without tiers, with a host tier, with a disk "
                        "tier, and a cold restart without and with the disk tier")
    p.add_argument("--tier-blocks", type=int, default=320,
                   help="KV cache blocks of the --tiers engines (default 320: the system "
                        "prompt and about a third of the conversations)")
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model = TinyLlama(DEMO_CONFIG)
    prompts = build_workload(args.conversations, args.system_tokens, args.user_min,
                             args.user_max, DEMO_CONFIG.vocab_size, args.seed)
    params = SamplingParams(max_tokens=args.max_tokens)
    n_params = sum(w.numel() for w in model.parameters())
    print(f"case study 1: {args.conversations} conversations, {args.system_tokens}-token shared "
          f"system prompt, {args.user_min}-{args.user_max}-token user turns, "
          f"{args.max_tokens} reply tokens each")
    print(f"model: tiny Llama, {DEMO_CONFIG.num_layers} layers, hidden {DEMO_CONFIG.hidden_size},"
          f" {n_params / 1e6:.1f}M params, float32 on {next(model.parameters()).device}; "
          f"KV blocks of {args.block_size} tokens")

    # Compile once (the graphs are shared by every engine), outside the timed runs: the
    # plain step's graph and, with two prompts sharing the system prompt's first blocks,
    # the cascade step's.
    t0 = time.perf_counter()
    warm = LLM(model, num_blocks=64, block_size=args.block_size,
               max_num_batched_tokens=args.max_batched_tokens, compile=not args.no_compile,
               enable_cascade=True)
    warm.generate([prompts[0][:40], prompts[1][:41], prompts[2][-7:]],
                  SamplingParams(max_tokens=3), use_tqdm=False)
    what = "compile + warm-up" if not args.no_compile else "warm-up"
    print(f"{what}: {time.perf_counter() - t0:.1f} s ({warm.num_compiled_graphs} graph(s) compiled)")

    if args.tiers:
        return _demo_tiers(model, prompts, args, t_start)
    done = run_variants_in_turns(model, prompts, params, args)
    names = [name for name, _ in VARIANTS]
    res = {name: _mean_runs(done[name]) for name in names}
    off, on, cas = (res[n] for n in names)

    mib = 2 ** 20
    rows = [("prompt tokens computed", "{:,}", "prefill_tokens"),
            ("prefill wall time", "{:.2f} s", "prefill_time_s")]
    table = [(name, [fmt.format(r[key]) for r in res.values()]) for name, fmt, key in rows]
    table += [
        ("prefill throughput",
         [f"{r['prefill_tokens'] / r['prefill_time_s']:,.0f} tok/s" for r in res.values()]),
        ("decode throughput (decode-only steps)",
         [f"{r['decode_tok_s']:,.0f} tok/s" for r in res.values()]),
        (f"KV blocks for the {len(prompts)} prompts", [f"{r['kv_blocks']:,}" for r in res.values()]),
        ("KV memory for the prompts", [f"{r['kv_bytes'] / mib:.1f} MiB" for r in res.values()]),
        ("prefix-cache hit rate", [f"{r['hit_rate']:.1%}" for r in res.values()]),
        ("cached prompt tokens", [f"{r['cached_prompt_tokens']:,}" for r in res.values()]),
        ("engine steps", [f"{r['steps']}" for r in res.values()]),
        ("steps with cascade attention", [f"{r['cascade_steps']}" for r in res.values()]),
    ]
    w0 = max(len(r[0]) for r in table)
    w = max(18, max(len(n) for n in names))
    print()
    print(f"{'':{w0}}  " + "  ".join(f"{n:>{w}}" for n in names))
    print(f"{'(engines stepped in turns)':{w0}}  " + "  ".join(
        f"{('1 run' if len(done[n]) == 1 else f'mean of {len(done[n])} runs'):>{w}}"
        for n in names))
    for name, cells in table:
        print(f"{name:{w0}}  " + "  ".join(f"{c:>{w}}" for c in cells))

    speedup = off["prefill_time_s"] / on["prefill_time_s"]
    token_ratio = off["prefill_tokens"] / on["prefill_tokens"]
    saved = 1 - on["kv_blocks"] / off["kv_blocks"]
    decode_speedup = cas["decode_tok_s"] / on["decode_tok_s"] if on["decode_tok_s"] else 0.0
    same = all(r["tokens"] == off["tokens"] for n in names for r in done[n])
    print()
    print(f"prefill speedup: {speedup:.2f}x (token-count bound {token_ratio:.2f}x)")
    print(f"KV blocks saved: {off['kv_blocks'] - on['kv_blocks']:,} of {off['kv_blocks']:,} "
          f"({saved:.1%}), {(off['kv_bytes'] - on['kv_bytes']) / mib:.1f} MiB")
    print(f"decode throughput with cascade attention: {decode_speedup:.2f}x the prefix-cached "
          f"engine's ({cas['cascade_steps']} of {cas['steps']} steps ran cascade)")
    print(f"greedy outputs identical in all runs: {'yes' if same else 'NO'}")
    total = time.perf_counter() - t_start
    print(f"summary: prefix caching computed {on['prefill_tokens']:,} instead of "
          f"{off['prefill_tokens']:,} prompt tokens, prefill {speedup:.1f}x faster, "
          f"{saved:.0%} fewer KV blocks; cascade decode {decode_speedup:.2f}x; same outputs "
          f"({total:.0f} s in all)")
    if args.json:
        result = {"off": {k: v for k, v in off.items() if k != "tokens"},
                  "on": {k: v for k, v in on.items() if k != "tokens"},
                  "cascade": {k: v for k, v in cas.items() if k != "tokens"},
                  "runs": {n: len(done[n]) for n in names},
                  "speedup": speedup, "token_ratio": token_ratio, "blocks_saved": saved,
                  "decode_speedup_cascade": decode_speedup,
                  "outputs_identical": same, "total_s": total}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if same else 1


def _demo_tiers(model, prompts, args, t_start: float) -> int:
    from .demo_tiers import outputs_identical, run_tiers, summaries, tier_rows
    runs = run_tiers(model, prompts, args, DEMO_CONFIG.vocab_size)
    results = summaries(runs)
    print(f"\nsecond turns with a KV cache of {args.tier_blocks} blocks of {args.block_size} "
          "tokens (engines stepped in turns):\n")
    print("\n".join(tier_rows(results)))
    same = outputs_identical(runs)
    base, host, disk, cold, warm = runs
    print(f"\nhost tier: {host.prefill_tokens:,} instead of {base.prefill_tokens:,} prompt "
          f"tokens computed, prefill {base.prefill_time_s / host.prefill_time_s:.1f}x faster; "
          f"disk tier: {disk.prefill_tokens:,}, {base.prefill_time_s / disk.prefill_time_s:.1f}x; "
          f"cold restart with the disk tier: {warm.prefill_tokens:,} instead of "
          f"{cold.prefill_tokens:,}, {cold.prefill_time_s / warm.prefill_time_s:.1f}x")
    print(f"greedy outputs identical in all runs: {'yes' if same else 'NO'} "
          f"({time.perf_counter() - t_start:.0f} s in all)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results | {"outputs_identical": same}, f, indent=2)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
