"""`pagedkv demo`: the seed's case study 1, run for real.

A customer-support chatbot: 64 concurrent conversations share a 500-token system
prompt, each followed by a 50-200-token user turn. The same prompts go through the
engine twice, without and with prefix caching, on the same compiled model; the
demo prints what the engine measured: prompt tokens computed, prefill wall time,
KV blocks needed to hold the 64 prompts, prefix-cache hit rate, and checks that
both runs produced the same tokens.
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
from .llm import LLM
from .request import RequestOutput
from .sampling import SamplingParams

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


def _summarize(llm: LLM, reqs, prompts, block_size: int) -> dict:
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
        "steps": st.num_steps,
        "kv_blocks": kv_blocks,
        "kv_bytes": kv_blocks * llm.kv_cache.block_bytes,
        "peak_blocks_in_use": st.peak_blocks_used,
        "hit_rate": st.hit_rate,
        "cached_prompt_tokens": sum(o.metrics.num_cached_tokens for o in outs),
        "preemptions": st.num_preemptions,
        "compiled_graphs": llm.num_compiled_graphs,
        "tokens": [o.token_ids for o in outs],
    }


def run_in_turns(model, prompts, params, args) -> tuple[dict, list[dict]]:
    """Run the workload without and with prefix caching, one engine step each in turn.

    A shared machine's speed drifts by 2x within minutes; stepping both engines
    alternately makes the drift hit both alike. The prefix-cached run finishes first,
    so it is repeated on a fresh engine (an empty prefix cache) until the uncached one
    is done; every completed repeat is kept.
    """
    def start(prefix_caching: bool):
        llm = LLM(model, num_blocks=args.num_blocks, block_size=args.block_size,
                  enable_prefix_caching=prefix_caching,
                  max_num_batched_tokens=args.max_batched_tokens, max_num_seqs=len(prompts),
                  compile=not args.no_compile)
        return llm, [llm.add_request(p, params) for p in prompts]

    off, off_reqs = start(False)
    on, on_reqs = start(True)
    on_done: list[dict] = []
    with tqdm(total=len(prompts), desc="requests (no prefix cache)", unit="req",
              disable=args.quiet, dynamic_ncols=True) as bar:
        while off.has_unfinished() or not on_done:
            if off.has_unfinished():
                bar.update(len(off.step().finished))
            on.step()
            if not on.has_unfinished():
                on_done.append(_summarize(on, on_reqs, prompts, args.block_size))
                bar.set_postfix_str(f"prefix-cached runs done: {len(on_done)}")
                if off.has_unfinished():
                    on, on_reqs = start(True)
    return _summarize(off, off_reqs, prompts, args.block_size), on_done


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

    # Compile once (the graph is shared by both engines), outside the timed runs.
    t0 = time.perf_counter()
    warm = LLM(model, num_blocks=64, block_size=args.block_size,
               max_num_batched_tokens=args.max_batched_tokens, compile=not args.no_compile)
    warm.generate([prompts[0][:40], prompts[1][-7:]], SamplingParams(max_tokens=3),
                  use_tqdm=False)
    what = "compile + warm-up" if not args.no_compile else "warm-up"
    print(f"{what}: {time.perf_counter() - t0:.1f} s ({warm.num_compiled_graphs} graph(s) compiled)")

    off, on_runs = run_in_turns(model, prompts, params, args)
    on = dict(on_runs[0])
    for key in ("prefill_time_s", "decode_time_s"):
        on[key] = sum(r[key] for r in on_runs) / len(on_runs)

    mib = 2 ** 20
    rows = [
        ("prompt tokens computed", f"{off['prefill_tokens']:,}", f"{on['prefill_tokens']:,}"),
        ("prefill wall time", f"{off['prefill_time_s']:.2f} s", f"{on['prefill_time_s']:.2f} s"),
        ("prefill throughput", f"{off['prefill_tokens'] / off['prefill_time_s']:,.0f} tok/s",
         f"{on['prefill_tokens'] / on['prefill_time_s']:,.0f} tok/s"),
        (f"KV blocks for the {len(prompts)} prompts", f"{off['kv_blocks']:,}", f"{on['kv_blocks']:,}"),
        ("KV memory for the prompts", f"{off['kv_bytes'] / mib:.1f} MiB",
         f"{on['kv_bytes'] / mib:.1f} MiB"),
        ("prefix-cache hit rate", f"{off['hit_rate']:.1%}", f"{on['hit_rate']:.1%}"),
        ("cached prompt tokens", f"{off['cached_prompt_tokens']:,}",
         f"{on['cached_prompt_tokens']:,}"),
        ("engine steps", f"{off['steps']}", f"{on['steps']}"),
    ]
    w0 = max(len(r[0]) for r in rows)
    print()
    print(f"{'':{w0}}  {'no prefix cache':>18}  {'prefix cache':>18}")
    print(f"{'(engines stepped in turns)':{w0}}  {'1 run':>18}  "
          f"{f'mean of {len(on_runs)} runs':>18}")
    for name, a, b in rows:
        print(f"{name:{w0}}  {a:>18}  {b:>18}")

    speedup = off["prefill_time_s"] / on["prefill_time_s"]
    token_ratio = off["prefill_tokens"] / on["prefill_tokens"]
    saved = 1 - on["kv_blocks"] / off["kv_blocks"]
    same = all(off["tokens"] == r["tokens"] for r in on_runs)
    print()
    print(f"prefill speedup: {speedup:.2f}x (token-count bound {token_ratio:.2f}x)")
    print(f"KV blocks saved: {off['kv_blocks'] - on['kv_blocks']:,} of {off['kv_blocks']:,} "
          f"({saved:.1%}), {(off['kv_bytes'] - on['kv_bytes']) / mib:.1f} MiB")
    print(f"greedy outputs identical with and without prefix caching: {'yes' if same else 'NO'}")
    total = time.perf_counter() - t_start
    print(f"summary: prefix caching computed {on['prefill_tokens']:,} instead of "
          f"{off['prefill_tokens']:,} prompt tokens, prefill {speedup:.1f}x faster, "
          f"{saved:.0%} fewer KV blocks, same outputs ({total:.0f} s in all)")
    if args.json:
        result = {"off": {k: v for k, v in off.items() if k != "tokens"},
                  "on": {k: v for k, v in on.items() if k != "tokens"},
                  "on_runs": len(on_runs),
                  "speedup": speedup, "token_ratio": token_ratio, "blocks_saved": saved,
                  "outputs_identical": same, "total_s": total}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
