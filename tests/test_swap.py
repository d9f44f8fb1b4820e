"""Preemption by swap: a preempted sequence's K/V go to a CPU swap space (swap_blocks)
and come back when it resumes, instead of being computed again.

Specification: outputs are identical to a run without preemption (greedy, seeded
sampling, forks; prefix caching on and off); a swapped sequence computes none of its
tokens again; a full swap space falls back to recompute; every block and swap block is
free at the end.
"""
from __future__ import annotations

import random

import pytest
import torch

from torch_pagedkv.cache.kv_cache import KVCache
from torch_pagedkv.engine import LLM, SamplingParams
from torch_pagedkv.engine.request import SequenceStatus
from torch_pagedkv.engine.swap import SwapSpace
from torch_pagedkv.models import LlamaConfig, TinyLlama

CFG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_size=16, max_position=1024, seed=8)
BLOCK = 4
KV_BLOCK = KVCache.bytes_per_block(CFG.num_layers, CFG.num_kv_heads, CFG.head_size, BLOCK,
                                   torch.float32)
ROOMY_SWAP = 64 * KV_BLOCK  # every preempted sequence fits


@pytest.fixture(scope="module")
def model() -> TinyLlama:
    return TinyLlama(CFG)


def workload(seed: int = 0):
    rng = random.Random(seed)
    shared = [rng.randrange(CFG.vocab_size) for _ in range(12)]
    prompts = [(shared if i % 2 else []) + [rng.randrange(CFG.vocab_size)
                                            for _ in range(rng.randint(3, 20))] for i in range(10)]
    params = [SamplingParams(max_tokens=14, temperature=0.9 * (i % 3 == 1), seed=i,
                             n=1 + (i % 4 == 0)) for i in range(10)]
    return prompts, params


def tokens(outs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outs]


def run(model, prompts, params, **kw) -> tuple[LLM, list]:
    args = dict(num_blocks=14, block_size=BLOCK, max_num_batched_tokens=32, compile=False)
    args.update(kw)
    llm = LLM(model, **args)
    return llm, llm.generate(prompts, params, use_tqdm=False)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_swapped_runs_equal_a_run_without_preemption(model, prefix_caching):
    prompts, params = workload()
    roomy, want = run(model, prompts, params, num_blocks=512,
                      enable_prefix_caching=prefix_caching)
    assert roomy.stats.num_preemptions == 0
    llm, got = run(model, prompts, params, preemption_mode="swap",
                   swap_space_bytes=ROOMY_SWAP, enable_prefix_caching=prefix_caching)
    assert tokens(got) == tokens(want)
    st = llm.stats
    assert st.num_preemptions > 0 and st.num_swapped_out == st.num_preemptions
    assert st.num_swapped_out_blocks > 0
    if not prefix_caching:  # every swapped block came back, and no token was recomputed
        assert st.num_swapped_in_blocks == st.num_swapped_out_blocks
        assert st.num_prefill_tokens == roomy.stats.num_prefill_tokens
    else:  # the prefix cache gave some back for free
        assert 0 < st.num_swapped_in_blocks <= st.num_swapped_out_blocks
    assert llm.block_manager.num_free_blocks == 14
    assert llm.swap.num_free_blocks == llm.swap.num_blocks


def test_swap_computes_less_than_recompute(model):
    prompts, params = workload(1)
    rec, want = run(model, prompts, params, enable_prefix_caching=False)
    swp, got = run(model, prompts, params, enable_prefix_caching=False, preemption_mode="swap",
                   swap_space_bytes=ROOMY_SWAP)
    assert tokens(got) == tokens(want)
    assert rec.stats.num_preemptions > 0 and swp.stats.num_swapped_out > 0
    assert swp.stats.num_prefill_tokens < rec.stats.num_prefill_tokens


def test_a_full_swap_space_falls_back_to_recompute(model):
    prompts, params = workload(2)
    _, want = run(model, prompts, params, num_blocks=512)
    llm, got = run(model, prompts, params, preemption_mode="swap",
                   swap_space_bytes=3 * KV_BLOCK)  # 3 blocks: room for few sequences
    assert llm.swap.num_blocks == 3
    assert tokens(got) == tokens(want)
    st = llm.stats
    assert 0 < st.num_swapped_out < st.num_preemptions  # some swapped, some recomputed
    assert llm.swap.num_free_blocks == 3


def test_a_swapped_sequence_waits_in_the_swap_space(model):
    prompts, params = workload(3)
    llm = LLM(model, num_blocks=14, block_size=BLOCK, max_num_batched_tokens=32, compile=False,
              preemption_mode="swap")
    reqs = [llm.add_request(p, sp) for p, sp in zip(prompts, params)]
    while llm.has_unfinished():
        llm.step()
        swapped = [s for r in reqs for s in r.sequences if s.status is SequenceStatus.SWAPPED]
        for s in swapped:  # off the cache, on the swap space, with its progress
            assert s.block_table is None and s.seq_id not in llm.block_manager
            assert len(s.swapped.blocks) == -(-s.swapped.num_tokens // BLOCK)
        held = sum(len(s.swapped.blocks) for s in swapped)
        assert llm.swap.num_free_blocks == llm.swap.num_blocks - held
    assert llm.stats.num_swapped_out > 0


def test_swap_space_round_trip_restores_blocks_bit_for_bit():
    kv = KVCache(2, 2, 16, BLOCK, num_blocks=8, dtype=torch.bfloat16)
    for t in kv.key_caches + kv.value_caches:
        t.copy_(torch.randn_like(t, dtype=torch.float32).to(t.dtype))
    before = [t.clone() for t in kv.key_caches + kv.value_caches]
    swap = SwapSpace(kv, num_blocks=4)
    held = swap.allocate(3)
    assert swap.allocate(2) is None and swap.num_free_blocks == 1  # refused: nothing taken
    swap.swap_out(list(zip([5, 1, 6], held)))
    for t in kv.key_caches + kv.value_caches:
        t.zero_()
    swap.swap_in(list(zip(held, [0, 2, 3])))
    swap.free(held)
    for now, old in zip(kv.key_caches + kv.value_caches, before):
        assert torch.equal(now[[0, 2, 3]], old[[5, 1, 6]])
    assert swap.num_free_blocks == 4


def test_preemption_settings_are_checked(model):
    with pytest.raises(ValueError, match="preemption_mode"):
        LLM(model, num_blocks=8, compile=False, preemption_mode="page-out")
    with pytest.raises(ValueError, match="preemption_mode='swap'"):
        LLM(model, num_blocks=8, compile=False, swap_space_bytes=2**20)
    with pytest.raises(ValueError, match="holds no KV block"):
        LLM(model, num_blocks=8, compile=False, preemption_mode="swap", swap_space_bytes=10)
    llm = LLM(model, num_blocks=8, block_size=BLOCK, compile=False, preemption_mode="swap")
    assert llm.swap.num_blocks == 8  # by default as large as the cache (up to 4 GiB)


def test_aborting_a_swapped_out_request_frees_its_swap_blocks(model):
    prompts, params = workload(4)
    llm = LLM(model, num_blocks=14, block_size=BLOCK, max_num_batched_tokens=32, compile=False,
              preemption_mode="swap", swap_space_bytes=ROOMY_SWAP)
    reqs = [llm.add_request(p, sp) for p, sp in zip(prompts, params)]
    victim = None
    while victim is None and llm.has_unfinished():
        llm.step()
        victim = next((r for r in reqs if any(s.status is SequenceStatus.SWAPPED
                                              for s in r.sequences)), None)
    assert victim is not None, "no sequence was swapped out: the test would prove nothing"
    held = sum(len(s.swapped.blocks) for r in reqs for s in r.sequences if s.swapped)
    mine = sum(len(s.swapped.blocks) for s in victim.sequences if s.swapped)
    assert llm.swap.num_free_blocks == llm.swap.num_blocks - held
    llm.abort(victim.request_id)
    assert llm.swap.num_free_blocks == llm.swap.num_blocks - held + mine
    assert all(s.status is SequenceStatus.FINISHED and s.swapped is None
               for s in victim.sequences)
    while llm.has_unfinished():
        step = llm.step()
        assert victim not in {s.seq.request for s in step.scheduled.scheduled}
    assert llm.swap.num_free_blocks == llm.swap.num_blocks
    assert llm.block_manager.num_free_blocks == 14
