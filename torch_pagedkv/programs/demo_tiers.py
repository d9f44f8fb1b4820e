"""`pagedkv demo --tiers`: case study 1 with a second turn, a KV cache too small to keep
the first turns, and the prefix cache's host and disk tiers.

Every conversation comes back: its second prompt is the first prompt, the reply, and a
new 50-200-token user turn. The KV cache holds the shared system prompt and only some of
the conversations, so by the second turn most first turns were evicted. Without tiers
they are computed again; with a host tier (LLM(host_cache_bytes=...)) or a disk tier
(LLM(disk_cache_dir=...)) they are copied back. Then a cold restart: a fresh engine runs
the second turns alone, without and with the disk directory as the first turns left it.

The engines of a comparison are stepped in turns (one step each, round robin), so the
drift of a shared machine hits all alike. Each engine reports its own counters:
prompt tokens computed, prefill wall time, prompt tokens served per prefill second.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field

from ..cache.kv_cache import KVCache
from ..engine.llm import LLM
from ..engine.sampling import SamplingParams


@dataclass
class TierRun:
    """One engine's second turn (or its only turn, after a restart)."""

    name: str
    llm: LLM
    reqs: list = field(default_factory=list)
    prefill_tokens: int = 0
    prefill_time_s: float = 0.0
    prompt_tokens: int = 0
    host_hits: int = 0
    disk_hits: int = 0
    tier_io_s: float = 0.0  # of the prefill time: tier copies and file reads/writes
    first_turn_prefill_s: float = float("nan")  # the engine's first turn, if it had one
    _base: tuple = ()  # the engine's counters when this turn started

    def counters(self) -> tuple:
        st, tiers = self.llm.stats, self.llm.tiers
        return (st.num_prefill_tokens, st.prefill_time_s, st.num_host_hit_tokens,
                st.num_disk_hit_tokens, 0.0 if tiers is None else tiers.stats.io_time_s)

    def start(self, prompts, params) -> None:
        if self.reqs:  # a second turn
            self.first_turn_prefill_s = self.prefill_time_s
        self._base = self.counters()
        self.reqs = [self.llm.add_request(p, params) for p in prompts]
        self.prompt_tokens = sum(len(p) for p in prompts)

    def finish(self) -> None:
        (self.prefill_tokens, self.prefill_time_s, self.host_hits, self.disk_hits,
         self.tier_io_s) = (a - b for a, b in zip(self.counters(), self._base))

    @property
    def tokens(self) -> list[list[int]]:
        return [self.llm.output(r).token_ids for r in self.reqs]


def step_in_turns(runs: list[TierRun]) -> None:
    while any(r.llm.has_unfinished() for r in runs):
        for r in runs:
            if r.llm.has_unfinished():
                r.llm.step()
    for r in runs:
        r.finish()


def second_turns(prompts, replies, user_min: int, user_max: int, vocab: int,
                 seed: int) -> list[list[int]]:
    rng = random.Random(seed + 1)
    return [p + r + [rng.randrange(vocab) for _ in range(rng.randint(user_min, user_max))]
            for p, r in zip(prompts, replies)]


def run_tiers(model, prompts: list[list[int]], args, vocab: int) -> list[TierRun]:
    """Both turns on engines without tiers, with a host tier, with a disk tier; then the
    second turns on fresh engines without and with (a copy of) the disk tier's directory
    as it was after the first turns."""
    params = SamplingParams(max_tokens=args.max_tokens)
    # Ample: room for every block of both turns (about twice the first turns' blocks).
    block_bytes = KVCache.bytes_per_block(model.num_layers, model.num_kv_heads,
                                          model.head_size, args.block_size, model.dtype)
    host_bytes = 3 * sum(-(-len(p) // args.block_size) for p in prompts) * block_bytes

    def new(**tiers) -> LLM:
        return LLM(model, num_blocks=args.tier_blocks, block_size=args.block_size,
                   max_num_batched_tokens=args.max_batched_tokens, max_num_seqs=len(prompts),
                   compile=not args.no_compile, **tiers)

    with tempfile.TemporaryDirectory(prefix="pagedkv-tiers-") as root:
        live, restart = os.path.join(root, "live"), os.path.join(root, "restart")
        runs = [TierRun("no tiers", new()), TierRun("host tier", new(host_cache_bytes=host_bytes)),
                TierRun("disk tier", new(disk_cache_dir=live))]
        for r in runs:
            r.start(prompts, params)
        step_in_turns(runs)
        shutil.copytree(live, restart)  # what a restart after the first turns finds
        replies = runs[0].tokens
        turn2 = second_turns(prompts, replies, args.user_min, args.user_max, vocab, args.seed)
        for r in runs:
            r.start(turn2, params)
        step_in_turns(runs)
        cold = [TierRun("restart, no disk tier", new()),
                TierRun("restart, disk tier", new(disk_cache_dir=restart))]
        for r in cold:
            r.start(turn2, params)
        step_in_turns(cold)
    return runs + cold


def summaries(runs: list[TierRun]) -> dict[str, dict]:
    keys = ("prompt_tokens", "prefill_tokens", "prefill_time_s", "host_hits", "disk_hits",
            "tier_io_s", "first_turn_prefill_s")
    return {r.name: {k: getattr(r, k) for k in keys} for r in runs}


def tier_rows(results: dict[str, dict]) -> list[str]:
    """The comparison (run name -> summary) as Markdown table rows."""
    def served(r):
        return f"{r['prompt_tokens'] / r['prefill_time_s']:,.0f}" if r["prefill_time_s"] else "-"

    rows = [
        ("prompt tokens", lambda r: f"{r['prompt_tokens']:,}"),
        ("prompt tokens computed", lambda r: f"{r['prefill_tokens']:,}"),
        ("restored from host / disk", lambda r: f"{r['host_hits']:,} / {r['disk_hits']:,}"),
        ("prefill wall time", lambda r: f"{r['prefill_time_s']:.2f} s"),
        ("prompt tokens per prefill second", served),
        ("tier copies + disk I/O (all steps)", lambda r: f"{r['tier_io_s']:.2f} s"),
        ("first turn's prefill wall time", lambda r: "-" if r["first_turn_prefill_s"] != r[
            "first_turn_prefill_s"] else f"{r['first_turn_prefill_s']:.2f} s"),
    ]
    out = ["| second turn | " + " | ".join(results) + " |", "|---|" + "---:|" * len(results)]
    out += ["| " + name + " | " + " | ".join(cell(r) for r in results.values()) + " |"
            for name, cell in rows]
    return out


def outputs_identical(runs: list[TierRun]) -> bool:
    return all(r.tokens == runs[0].tokens for r in runs)
