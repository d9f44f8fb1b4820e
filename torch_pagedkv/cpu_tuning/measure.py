"""Measures the CPU choices (choices.py) on this machine, each within a time budget.

Every comparison is of the default against one alternative, timed in interleaved rounds
(order alternating, so drift hits both alike); the alternative wins only when it is
faster by more than MARGIN in the median of per-round ratios AND in at least
AGREEMENT of the rounds. Anything less is noise and keeps the default: a choice never
flips between runs on a measurement that cannot separate two options.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import knobs
from ..cache import StepPlanner
from ..cache.step_plan import ALWAYS_CASCADE
from ..layers import packed_linear
from ..layers.attention import cascade_attention, write_and_attend  # noqa: F401
from ..ops import paged_attention
from .choices import (ALL_ROWS, NEVER_SEQS, AttentionChoice, CascadeChoice, LinearChoice)

MARGIN = 0.05      # an alternative must be this much faster (median of round ratios)
AGREEMENT = 0.75   # ... in at least this share of the rounds
ROUNDS = 7
MIN_CALL_S = 2e-3  # a timed sample repeats its call to at least this long


class Budget:
    """Seconds left for a measurement; a comparison that would overrun keeps the default."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def _sample(fn: Callable[[], object], reps: int) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def compare(base: Callable[[], object], alt: Callable[[], object], budget: Budget,
            rounds: int = ROUNDS) -> dict:
    """Times base and alt in interleaved rounds. Returns {"ratio": median alt/base time,
    "agree": share of rounds alt was faster, "verdict": "alt" | "base" | "tie", "rounds"}.
    A verdict other than "tie" needs MARGIN and AGREEMENT (module docstring)."""
    base(), alt()  # warm: first-call packing, page faults, thread pool start
    one = max(_sample(base, 1), _sample(alt, 1), 1e-6)
    reps = max(1, int(MIN_CALL_S / one))
    if budget.left() < 2 * rounds * reps * one * 1.2:
        rounds = max(3, int(budget.left() / (2 * reps * one * 1.2)))
        if budget.left() < 2 * rounds * reps * one:
            return {"ratio": 1.0, "agree": 0.0, "verdict": "tie", "rounds": 0,
                    "note": "out of time budget"}
    ratios = []
    for r in range(rounds):
        if r % 2:
            a = _sample(alt, reps)
            b = _sample(base, reps)
        else:
            b = _sample(base, reps)
            a = _sample(alt, reps)
        ratios.append(a / b)
    ratio = statistics.median(ratios)
    faster = sum(x < 1 for x in ratios) / rounds
    verdict = "tie"
    if ratio < 1 - MARGIN and faster >= AGREEMENT:
        verdict = "alt"
    elif ratio > 1 / (1 - MARGIN) and 1 - faster >= AGREEMENT:
        verdict = "base"
    return {"ratio": round(ratio, 3), "agree": round(faster, 2), "verdict": verdict,
            "rounds": rounds}


# -- linear: packed oneDNN weight vs aten's F.linear, per row count -----------------------

LINEAR_ROWS = (1, 4, 16, 64, 256, 1024)


def measure_linear(dtype: torch.dtype, out_features: int, in_features: int,
                   default: LinearChoice, budget: Budget) -> tuple[LinearChoice, dict]:
    """The row range in which this weight shape runs packed: per row count of LINEAR_ROWS
    a verdict (packed, aten or tie), then the range losing the fewest decisive verdicts,
    the nearest to the default among those (the default itself when it loses no more)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=gen).to(dtype)
    b = torch.randn(out_features, generator=gen).to(dtype)
    verdicts: dict[int, str] = {}
    detail: dict[str, dict] = {}
    for rows in LINEAR_ROWS:
        if budget.left() <= 0:
            break
        x = torch.randn(rows, in_features, generator=gen).to(dtype)
        entry = packed_linear.packed_weight(w)
        res = compare(lambda: F.linear(x, w, b),
                      lambda: packed_linear.packed_forward(x, w, b, entry), budget)
        verdicts[rows] = {"alt": "packed", "base": "aten", "tie": "tie"}[res["verdict"]]
        detail[str(rows)] = {"packed/aten": res["ratio"], "verdict": verdicts[rows]}
    # Candidate rules: packed for rows in [lo, hi], bounds between measured row counts.
    his = [0, *LINEAR_ROWS[:-1], ALL_ROWS]
    los = [1, *(r + 1 for r in LINEAR_ROWS[:-1])]
    rules = [(lo, hi) for lo in los for hi in his if hi == 0 and lo == 1 or lo <= hi]

    def losses(rule: tuple[int, int]) -> int:
        c = LinearChoice(rule[1], rule[0])
        return sum((v == "aten" and c.packs(r)) or (v == "packed" and not c.packs(r))
                   for r, v in verdicts.items())

    base = (_nearest(los, default.packed_min_rows), _nearest(his, default.packed_max_rows))

    def distance(rule: tuple[int, int]) -> int:
        return abs(los.index(rule[0]) - los.index(base[0])) + abs(his.index(rule[1]) - his.index(base[1]))

    best = min(rules, key=lambda r: (losses(r), distance(r)))
    choice = default if losses(best) == losses(base) else LinearChoice(best[1], best[0])
    return choice, {"rows": detail}


def _nearest(values: list[int], v: int) -> int:
    return min(values, key=lambda x: abs(x - v))


# -- attention kernels: variant and tiling --------------------------------------------------

def _paged_inputs(cache_dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_size: int,
                  block_size: int, seqs: list[tuple[int, int]], gen: torch.Generator):
    """A batch over a randomly laid out cache: seqs = [(context, new tokens)]."""
    blocks = [-(-ctx // block_size) for ctx, _ in seqs]
    total = sum(blocks)
    perm = torch.randperm(total, generator=gen)
    width = max(blocks)
    table = torch.zeros(len(seqs), width, dtype=torch.int32)
    at = 0
    for i, n in enumerate(blocks):
        table[i, :n] = perm[at:at + n].to(torch.int32)
        at += n
    shape = (total, block_size, num_kv_heads, head_size)
    kc = torch.randn(shape, generator=gen).to(cache_dtype)
    vc = torch.randn(shape, generator=gen).to(cache_dtype)
    qdtype = cache_dtype if cache_dtype in (torch.float32, torch.bfloat16, torch.float16) \
        else torch.bfloat16
    q = torch.randn(sum(n for _, n in seqs), num_heads, head_size, generator=gen).to(qdtype)
    lens = torch.tensor([ctx for ctx, _ in seqs], dtype=torch.int32)
    qsl = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor([n for _, n in seqs]), 0)
    return q, kc, vc, table, lens, qsl


def attention_workload(cache_dtype: torch.dtype, num_heads: int, num_kv_heads: int,
                       head_size: int, block_size: int) -> Callable[[], object]:
    """One decode step of 16 sequences x 1024 tokens and one 256-token prefill chunk over
    a 768-token prefix: the two shapes an engine step is made of."""
    gen = torch.Generator().manual_seed(1)
    decode = _paged_inputs(cache_dtype, num_heads, num_kv_heads, head_size, block_size,
                           [(1024, 1)] * 16, gen)
    prefill = _paged_inputs(cache_dtype, num_heads, num_kv_heads, head_size, block_size,
                            [(1024, 256)], gen)
    scale = head_size ** -0.5

    def run():
        for q, kc, vc, table, lens, qsl in (decode, prefill):
            paged_attention(q, kc, vc, table, lens, qsl, scale)
    return run


def _with_knobs(choice: AttentionChoice, fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with knobs.override(**choice.knobs()):
            return fn()
    return run


def runnable_isas() -> list[str]:
    info = getattr(knobs, "cpu_isa_info", None)
    return list(info()["runnable"]) if info is not None else []


def measure_attention(cache_dtype: torch.dtype, num_heads: int, num_kv_heads: int,
                      head_size: int, block_size: int, default: AttentionChoice,
                      budget: Budget) -> tuple[AttentionChoice, dict]:
    """Coordinate descent from the default: the ISA variants this CPU runs, then each
    tiling parameter's neighbours, each kept only on a decisive win (compare)."""
    if "cpu_vectors_per_head" not in knobs.KNOBS:  # a library without the tiling knobs
        return default, {"note": "this library has no CPU tiling knobs"}
    work = attention_workload(cache_dtype, num_heads, num_kv_heads, head_size, block_size)
    best = default
    tried: dict[str, dict] = {}
    active = knobs.cpu_isa_info()["active"] if default.isa == "auto" else default.isa
    candidates: list[tuple[str, object]] = [("isa", v) for v in runnable_isas() if v != active]
    candidates += [("vectors_per_head", v) for v in (16, 64)]
    candidates += [("vectors_per_item", v) for v in (32, 128)]
    # the matrix-style tiles: the workload's causal prefill runs on them
    candidates += [("prefix_vectors_per_head", v) for v in (128, 512)]
    for name, value in candidates:
        if budget.left() <= 0:
            break
        alt = replace(best, **{name: value})
        res = compare(_with_knobs(best, work), _with_knobs(alt, work), budget, rounds=5)
        tried[f"{name}={value}"] = {"alt/base": res["ratio"], "verdict": res["verdict"]}
        if res["verdict"] == "alt":
            best = alt
    return best, {"workload": "decode 16 x 1024 + prefill 256 over 768", "tried": tried}


# -- cascade: a decode step with shared prefixes, plain vs cascade ------------------------

CASCADE_SEQS = (8, 16, 32)
CASCADE_PREFIX = (128, 256, 512)
CASCADE_RULES = [(s, p) for s in (4, 8, 16, 32, NEVER_SEQS) for p in (64, 128, 256, 512)]


def _cascade_step(cache_dtype, num_heads, num_kv_heads, head_size, block_size, seqs, prefix,
                  gen):
    """seqs sequences sharing `prefix` tokens of blocks, 128 own tokens each, decoding."""
    pb = prefix // block_size
    own = -(-128 // block_size)
    total = pb + seqs * own
    perm = torch.randperm(total, generator=gen).tolist()
    rows = [(perm[:pb] + perm[pb + i * own:pb + (i + 1) * own], prefix + 127, 1)
            for i in range(seqs)]
    width = pb + own
    planner = StepPlanner(block_size, max_num_seqs=seqs + 1, max_num_tokens=seqs,
                          max_blocks_per_seq=width, cascade=ALWAYS_CASCADE)
    meta = planner.plan(rows)
    shape = (total, block_size, num_kv_heads, head_size)
    kc = torch.randn(shape, generator=gen).to(cache_dtype)
    vc = torch.randn(shape, generator=gen).to(cache_dtype)
    q = torch.randn(seqs, num_heads, head_size, generator=gen).to(
        cache_dtype if cache_dtype.itemsize > 1 else torch.bfloat16)
    scale = head_size ** -0.5
    plain = lambda: paged_attention(q, kc, vc, meta.block_table, meta.seq_lens,  # noqa: E731
                                    meta.query_start_loc, scale)
    cascade = lambda: cascade_attention(q, kc, vc, meta.cascade, scale=scale)  # noqa: E731
    return plain, cascade


def measure_cascade(cache_dtype: torch.dtype, num_heads: int, num_kv_heads: int,
                    head_size: int, block_size: int, default: CascadeChoice,
                    budget: Budget) -> tuple[CascadeChoice, dict]:
    """Per (sequences, shared tokens) cell of a grid a verdict, then the rule losing the
    fewest decisive verdicts, the default among equals (then the nearest to it)."""
    gen = torch.Generator().manual_seed(2)
    verdicts: dict[tuple[int, int], str] = {}
    detail = {}
    for n in CASCADE_SEQS:
        for p in CASCADE_PREFIX:
            if budget.left() <= 0 or p % block_size:
                continue
            plain, cascade = _cascade_step(cache_dtype, num_heads, num_kv_heads, head_size,
                                           block_size, n, p, gen)
            res = compare(plain, cascade, budget, rounds=5)
            verdicts[(n, p)] = {"alt": "cascade", "base": "plain", "tie": "tie"}[res["verdict"]]
            detail[f"{n}x{p}"] = {"cascade/plain": res["ratio"], "verdict": verdicts[(n, p)]}

    def losses(rule: tuple[int, int]) -> int:
        s, t = rule
        return sum((v == "plain" and n >= s and p >= t) or (v == "cascade" and not (n >= s and p >= t))
                   for (n, p), v in verdicts.items())

    base = (default.min_seqs, default.min_shared_tokens)
    rules = CASCADE_RULES if base in CASCADE_RULES else [base, *CASCADE_RULES]

    def distance(rule: tuple[int, int]) -> float:
        import math
        return abs(math.log2(rule[0] / base[0])) + abs(math.log2(rule[1] / base[1]))

    best = min(rules, key=lambda r: (losses(r), distance(r)))
    choice = default if losses(best) == losses(base) else CascadeChoice(*best)
    return choice, {"grid (seqs x shared tokens)": detail}


def measure(context: str, default, budget: Budget) -> tuple[object, dict]:
    """Measures one context's choice (choices.py context strings)."""
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, whatever the caller's mode
        return _measure(context, default, budget)


def _measure(context: str, default, budget: Budget) -> tuple[object, dict]:
    kind, dtype_name, shape, *rest = context.split("/")
    dtype = getattr(torch, dtype_name)
    if kind == "linear":
        out_f, in_f = (int(x) for x in shape.split("x"))
        return measure_linear(dtype, out_f, in_f, default, budget)
    heads, kv, head = (int(x) for x in shape.split("x"))
    block = int(rest[0].removeprefix("b"))
    fn: Optional[Callable] = {"attention": measure_attention, "cascade": measure_cascade}[kind]
    return fn(dtype, heads, kv, head, block, default, budget)
