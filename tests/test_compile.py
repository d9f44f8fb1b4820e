"""torch.compile(fullgraph=True, dynamic=True) of write-then-attend: equals eager, writes
the cache in place, at most 2 graphs across batch/context shapes, and Inductor's output
code never copies or clones the cache."""
import math

import torch
from torch._inductor.utils import run_and_get_code

import torch_pagedkv as pk
from paged_inputs import make_batch

NUM_HEADS, KV_HEADS, HEAD, BLOCK = 8, 2, 64, 16


def write_then_attend(query, key, value, key_cache, value_cache, slot_mapping, block_table,
                      seq_lens, query_start_loc):
    pk.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
    return pk.paged_attention(query, key_cache, value_cache, block_table, seq_lens,
                              query_start_loc, 1.0 / math.sqrt(HEAD))


def step_inputs(seqs, seed, mark=True):
    """A step whose new tokens (the last q_len of each sequence) are written, then attended."""
    # Fixed cache and block-table sizes, as an engine allocates them once.
    b = make_batch(seqs, NUM_HEADS, KV_HEADS, HEAD, BLOCK, torch.float32, seed=seed,
                   num_blocks=256, columns=40)
    g = torch.Generator().manual_seed(seed + 1)
    n = b.query.shape[0]
    key = torch.randn(n, KV_HEADS, HEAD, generator=g)
    value = torch.randn(n, KV_HEADS, HEAD, generator=g)
    slots = []
    for i, (q_len, seq_len) in enumerate(seqs):
        for pos in range(seq_len - q_len, seq_len):
            slots.append(int(b.block_table[i, pos // BLOCK]) * BLOCK + pos % BLOCK)
    args = (b.query, key, value, b.key_cache, b.value_cache, torch.tensor(slots, dtype=torch.int64),
            b.block_table, b.seq_lens, b.query_start_loc)
    if mark:
        mark_step_dims(args)
    return args


def mark_step_dims(args):
    """The token and sequence counts change every step. Marked unbacked, they are never
    specialized (not to 1, nor equal to each other, which duck sizing would assume for
    decode steps where num_tokens == num_seqs)."""
    query, key, value, _, _, slots, block_table, seq_lens, qsl = args
    for t in (query, key, value, slots, block_table, seq_lens, qsl):
        torch._dynamo.decorators.mark_unbacked(t, 0)


SHAPES = [
    [(1, 40), (1, 17), (1, 3)],           # decode, 3 sequences
    [(1, 200)] * 7,                        # decode, 7 sequences
    [(30, 30), (1, 64)],                   # prefill + decode
    [(12, 80), (5, 5), (1, 9), (2, 33)],   # chunked prefill over a cached prefix, mixed
    [(64, 64)],                            # one prefill
    [(1, 500), (9, 19)],
]


def clone_inputs(args):
    return [a.clone() for a in args]


def test_at_most_two_graphs_with_plain_dynamic_true():
    """Without marking, dynamic=True specializes sizes 0/1 and duck-sizes equal counts;
    fixed-size caches and block tables keep that to 2 graphs for decode-only steps."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(write_then_attend, backend=counting_backend, fullgraph=True,
                             dynamic=True)
    for seed, n in enumerate([3, 7, 2, 12, 5]):
        args = step_inputs([(1, 20 + 9 * i) for i in range(n)], seed, mark=False)
        compiled(*args)
    assert len(graphs) <= 2


def test_matches_eager_in_place_and_at_most_two_graphs():
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(write_then_attend, backend=counting_backend, fullgraph=True,
                             dynamic=True)
    for seed, seqs in enumerate(SHAPES):
        args = step_inputs(seqs, seed)
        eager_args = clone_inputs(args)
        want = write_then_attend(*eager_args)
        key_cache, value_cache = args[3], args[4]
        k_ptr = key_cache.data_ptr()
        got = compiled(*args)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        # Written in place: the caller's cache tensors hold the new K/V.
        assert key_cache.data_ptr() == k_ptr
        assert torch.equal(key_cache, eager_args[3]) and torch.equal(value_cache, eager_args[4])
    assert len(graphs) <= 2, f"{len(graphs)} graphs for {len(SHAPES)} shapes"


def test_inductor_code_never_copies_the_cache():
    torch._dynamo.reset()
    compiled = torch.compile(write_then_attend, fullgraph=True, dynamic=True)
    codes = []
    for seed, seqs in enumerate(SHAPES[:3]):
        _, code = run_and_get_code(compiled, *step_inputs(seqs, seed))
        codes += code
    text = "\n".join(codes)
    assert "torch.ops.pagedkv.reshape_and_cache.default(" in text
    assert "torch.ops.pagedkv.paged_attention.default(" in text
    for forbidden in ("clone", "copy_", ".copy(", "aten.copy"):
        assert forbidden not in text, f"Inductor output code contains {forbidden!r}:\n{text}"
