"""Soak: 1,000 random requests through a small cache, in both preemption modes.

Requests arrive a few per step, with shared prefixes (prefix caching), n > 1 samples
(forks, copy-on-write), stop tokens, greedy and seeded sampling; random requests are
aborted wherever they are (waiting, running, swapped out), and a tight cache keeps the
engine preempting, by recompute or by swap (with a swap space small enough to fall back
to recompute too).

Specification: after every step the BlockManager's invariants hold (every block is free
or referenced exactly by the live tables that list it, waiting sequences hold no block,
swap blocks are held only by swapped sequences); at the end every block and swap block
is free; every finished request's tokens equal the same request run alone, and an
aborted request's tokens are a prefix of them.
"""
from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from torch_pagedkv.engine import LLM, SamplingParams
from torch_pagedkv.engine.request import SequenceStatus
from torch_pagedkv.models import LlamaConfig, TinyLlama

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                  num_heads=2, num_kv_heads=1, head_size=16, max_position=256, seed=11)
NUM_REQUESTS = 1000
BLOCK = 4
NUM_BLOCKS = 24


def workload(seed: int) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(CFG.vocab_size) for _ in range(12)] for _ in range(3)]
    requests = []
    for i in range(NUM_REQUESTS):
        head = rng.choice(prefixes)[:rng.choice([0, 4, 8, 12])]
        prompt = head + [rng.randrange(CFG.vocab_size) for _ in range(rng.randint(1, 12))]
        params = SamplingParams(max_tokens=rng.randint(1, 8),
                                temperature=rng.choice([0.0, 0.0, 0.9]),
                                top_k=rng.choice([0, 5]), seed=i,
                                n=rng.choice([1, 1, 1, 2, 3]),
                                stop_token_ids=rng.sample(range(CFG.vocab_size), 3))
        requests.append((prompt, params))
    return requests


def check_invariants(llm: LLM) -> None:
    bm, sched = llm.block_manager, llm.scheduler
    running = sched.running
    assert set(bm._seqs) == {s.seq_id for s in running}
    assert all(s.block_table is bm.table(s.seq_id) for s in running)
    refs = Counter(b for s in running for b in s.block_table.block_ids)
    assert all(blk.ref_count == refs.get(blk.block_id, 0) for blk in bm._blocks)
    assert bm.num_free_blocks + len(refs) == bm.num_blocks
    assert not set(bm._free) & set(refs)
    for s in running:
        t = s.block_table
        assert len(t.block_ids) == -(-t.num_tokens // BLOCK) and t.num_committed <= t.num_tokens
    assert all(bm._blocks[b].hash == h for h, b in bm._cached.items())
    assert all(s.block_table is None for s in sched.waiting)
    if llm.swap is not None:
        held = [b for s in sched.waiting if s.swapped for b in s.swapped.blocks]
        assert len(held) + llm.swap.num_free_blocks == llm.swap.num_blocks
        assert len(set(held) | set(llm.swap._free)) == llm.swap.num_blocks


def soak(model, requests, mode: str, seed: int) -> tuple[LLM, dict, Counter]:
    """Run the workload with random arrivals and aborts; returns the engine, the requests
    by index, and where the aborted requests were when aborted."""
    rng = random.Random(seed)
    kw = dict(swap_space_bytes=6 * 2 * BLOCK * CFG.num_kv_heads * CFG.head_size * 4) \
        if mode == "swap" else {}
    llm = LLM(model, num_blocks=NUM_BLOCKS, block_size=BLOCK, max_num_batched_tokens=32,
              max_num_seqs=8, compile=False, preemption_mode=mode, **kw)
    added: dict[int, object] = {}
    aborted_where: Counter = Counter()
    pending = list(enumerate(requests))
    while pending or llm.has_unfinished():
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            if pending:
                i, (prompt, params) = pending.pop(0)
                added[i] = llm.add_request(prompt, params)
        live = [r for r in added.values() if not r.finished]
        swapped = [r for r in live if any(s.swapped for s in r.sequences)]
        if rng.random() < 0.1 and live:
            req = rng.choice(swapped if swapped and rng.random() < 0.5 else live)
            where = "swapped" if req in swapped else req.sequences[0].status.value
            aborted_where[where] += 1
            llm.abort(req.request_id)
        if rng.random() < 0.02 and added:
            done = [r for r in added.values() if r.finished]
            if done:
                llm.abort(rng.choice(done).request_id)  # a no-op
        llm.step()
        check_invariants(llm)
    llm.abort(10 ** 9)  # unknown: a no-op
    return llm, added, aborted_where


def alone(model, prompt, params) -> list[list[int]]:
    llm = LLM(model, num_blocks=64, block_size=BLOCK, compile=False,
              enable_prefix_caching=False)
    return [c.token_ids for c in llm.generate([prompt], params, use_tqdm=False)[0].outputs]


@pytest.fixture
def one_thread():
    """A tiny model gains nothing from threads, and a shared machine's busy cores would
    stall every parallel region."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_soak_1000_random_requests_both_preemption_modes(one_thread):
    model = TinyLlama(CFG)
    requests = workload(seed=1)
    reference: dict[int, list[list[int]]] = {}
    counts = {}
    for mode in ("recompute", "swap"):
        llm, added, aborted_where = soak(model, requests, mode, seed=2)
        bm = llm.block_manager
        assert bm.num_free_blocks == bm.num_blocks and not bm._seqs
        assert all(blk.ref_count == 0 for blk in bm._blocks)
        assert llm.swap is None or llm.swap.num_free_blocks == llm.swap.num_blocks
        finished = stops = 0
        for i, req in added.items():
            out = llm.output(req)
            if i not in reference:
                reference[i] = alone(model, *requests[i])
            got = [c.token_ids for c in out.outputs]
            reasons = {c.finish_reason for c in out.outputs}
            if "abort" in reasons:
                assert all(g == w[:len(g)] for g, w in zip(got, reference[i])), i
            else:
                assert got == reference[i], i
                finished += 1
                stops += sum(c.finish_reason == "stop" for c in out.outputs)
        st = llm.stats
        assert len(added) == NUM_REQUESTS and finished + st.num_aborted == NUM_REQUESTS
        assert st.num_preemptions > 0 and st.prefix_hits > 0 and st.num_cow_copies > 0
        assert stops > 0 and set(aborted_where) >= {"waiting", "running"}
        if mode == "swap":
            assert 0 < st.num_swapped_out < st.num_preemptions  # swapped, and fell back
            assert aborted_where["swapped"] > 0
        counts[mode] = dict(finished=finished, aborted=st.num_aborted,
                            aborted_while=dict(aborted_where), stops=stops,
                            preemptions=st.num_preemptions, swapped_out=st.num_swapped_out,
                            swapped_out_blocks=st.num_swapped_out_blocks,
                            swapped_in_blocks=st.num_swapped_in_blocks,
                            cow_copies=st.num_cow_copies, prefix_hit_tokens=st.prefix_hits,
                            steps=st.num_steps)
    print(f"\nsoak counts: {counts}")
