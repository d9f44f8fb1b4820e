"""BlockManager benchmark: hashing cost, allocate/free throughput, memory saved.

    python -m benchmarks.bench_block_manager [--json] [--seed 0]

1. Hashing: ns per token of the chained SHA-256 block hash at block sizes 16
   and 32, both as ``allocate`` does it (one ``hash_block`` call per block) and
   as ``commit`` does it (``hash_blocks`` over a run of blocks).
2. Throughput: 10,000 requests through allocate -> commit -> free, 64 live at
   a time, with and without prefix caching. Prompts are one of 8 shared
   256-token system prompts plus a random 32-768-token user part.
3. The seed's case study 1: 64 conversations sharing a 500-token system prompt,
   each with a 50-200-token user turn (uniform, seeded), block size 16: blocks
   held with and without prefix sharing, counted by a real BlockManager.

The manager is pure Python (importing the package loads torch, unused here).
Hashing numbers are best of --repeats; throughput is one timed pass.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from collections import deque

from benchmarks import machine
from torch_pagedkv.cache.block_hash import BlockHasher, root_hash
from torch_pagedkv.cache.block_manager import BlockManager

VOCAB = 128_000


def bench_hashing(block_size: int, num_tokens: int, repeats: int, rng: random.Random) -> dict:
    tokens = [rng.randrange(VOCAB) for _ in range(num_tokens)]
    hasher = BlockHasher(block_size)
    root = root_hash(0)
    num_blocks = num_tokens // block_size

    def per_block() -> None:  # allocate's lookup: one call per block
        parent = root
        for i in range(num_blocks):
            parent = hasher.hash_block(parent, tokens[i * block_size : (i + 1) * block_size])

    def chained() -> None:  # commit's path: one call for a run of blocks
        hasher.hash_blocks(tokens, root)

    result = {}
    for name, fn in (("per_block_call", per_block), ("hash_blocks", chained)):
        best = min(_time_ns(fn) for _ in range(repeats))
        result[name] = round(best / (num_blocks * block_size), 1)
    return {"ns_per_token": result["per_block_call"], "ns_per_token_hash_blocks": result["hash_blocks"]}


def bench_allocate_free(prefix_caching: bool, num_requests: int, seed: int) -> dict:
    rng = random.Random(seed)
    block_size, live = 16, 64
    systems = [[rng.randrange(VOCAB) for _ in range(256)] for _ in range(8)]
    prompts = [
        rng.choice(systems) + [rng.randrange(VOCAB) for _ in range(rng.randint(32, 768))]
        for _ in range(num_requests)
    ]
    bm = BlockManager(8192, block_size, enable_prefix_caching=prefix_caching, hash_seed=seed)
    window: deque[int] = deque()
    spent = {"allocate": 0, "commit": 0, "free": 0}
    clock = time.perf_counter_ns
    start = clock()
    for i, prompt in enumerate(prompts):
        if len(window) == live:
            t = clock()
            bm.free(window.popleft())
            spent["free"] += clock() - t
        t = clock()
        bm.allocate(i, prompt)
        t2 = clock()
        bm.commit(i, len(prompt))
        spent["allocate"] += t2 - t
        spent["commit"] += clock() - t2
        window.append(i)
    for i in window:
        t = clock()
        bm.free(i)
        spent["free"] += clock() - t
    total = clock() - start
    assert bm.num_free_blocks == bm.num_blocks
    tokens = sum(map(len, prompts))
    return {
        "requests": num_requests,
        "requests_per_s": round(num_requests / (total / 1e9)),
        "us_per_request": round(total / num_requests / 1e3, 2),
        "us_per_request_by_call": {k: round(v / num_requests / 1e3, 2) for k, v in spent.items()},
        "mean_prompt_tokens": round(tokens / num_requests, 1),
        "ns_per_prompt_token": round(total / tokens, 1),
        "hit_rate": round(bm.stats.hit_rate, 4),
        "evictions": bm.stats.evictions,
    }


def case_study(seed: int) -> dict:
    """64 conversations, one 500-token system prompt, 50-200-token user turns."""
    rng = random.Random(seed)
    block_size, n_conv, sys_len = 16, 64, 500
    system = [rng.randrange(VOCAB) for _ in range(sys_len)]
    turns = [rng.randint(50, 200) for _ in range(n_conv)]
    prompts = [system + [rng.randrange(VOCAB) for _ in range(n)] for n in turns]

    held = {}
    for sharing in (False, True):
        bm = BlockManager(4096, block_size, enable_prefix_caching=sharing, hash_seed=seed)
        for i, prompt in enumerate(prompts):  # one after another, each prefilled
            bm.allocate(i, prompt)
            bm.commit(i, len(prompt))
        held[sharing] = bm.num_blocks - bm.num_free_blocks
        hit_rate = bm.stats.hit_rate

    # The same by formula: the system prompt's full blocks once, the rest per conversation.
    shared = sys_len // block_size
    formula = shared + sum(-(-(sys_len - shared * block_size + n) // block_size) for n in turns)
    assert held[True] == formula, (held[True], formula)
    assert held[False] == sum(-(-(sys_len + n) // block_size) for n in turns)
    return {
        "conversations": n_conv,
        "system_prompt_tokens": sys_len,
        "user_turn_tokens": [min(turns), max(turns)],
        "mean_user_turn_tokens": round(sum(turns) / n_conv, 1),
        "block_size": block_size,
        "blocks_without_sharing": held[False],
        "blocks_with_sharing": held[True],
        "saved_pct": round(100 * (1 - held[True] / held[False]), 1),
        "hit_rate": round(hit_rate, 4),
    }


def _time_ns(fn) -> int:
    t = time.perf_counter_ns()
    fn()
    return time.perf_counter_ns() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--hash-tokens", type=int, default=1 << 18)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    results = {
        "python": platform.python_version(),
        "machine": machine.as_dict(1),
        "seed": args.seed,
        "hashing": {
            str(bs): bench_hashing(bs, args.hash_tokens, args.repeats, rng) for bs in (16, 32)
        },
        "allocate_commit_free": {
            "prefix_caching": bench_allocate_free(True, args.requests, args.seed),
            "no_prefix_caching": bench_allocate_free(False, args.requests, args.seed),
        },
        "case_study": case_study(args.seed),
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(machine.line(1))
    for bs, r in results["hashing"].items():
        print(
            f"hash, block size {bs:>2}: {r['ns_per_token']:6.1f} ns/token per block call, "
            f"{r['ns_per_token_hash_blocks']:6.1f} via hash_blocks"
        )
    for name, r in results["allocate_commit_free"].items():
        print(
            f"{r['requests']} requests ({name}): {r['requests_per_s']:>7} req/s, "
            f"{r['us_per_request']} us/request {r['us_per_request_by_call']}, "
            f"hit rate {r['hit_rate']:.1%}"
        )
    c = results["case_study"]
    print(
        f"case study: {c['blocks_without_sharing']} blocks without sharing, "
        f"{c['blocks_with_sharing']} with, {c['saved_pct']}% saved"
    )


if __name__ == "__main__":
    main()
