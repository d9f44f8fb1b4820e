"""torch.compile(fullgraph=True, dynamic=True) of write-then-attend: equals eager, writes
the cache in place, at most 2 graphs across batch/context shapes, and Inductor's output
code never copies or clones the cache."""
import math

import torch
import torch.fx.experimental._config as fx_config
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


# Cascade attention (a step's shared prefixes read once) compiles without a graph break,
# and steps whose groups change in number and size reuse one cascade graph beside the
# plain one: the planner's cascade tensors have fixed shapes or per-step sizes only
# (with duck sizing off, as the engine compiles).
CASCADE_STEPS = [  # (groups, loners): see paged_inputs.prefix_group_rows
    ([(3, [(0, 1), (5, 1), (2, 1)])], [(40, 1)]),
    ([(2, [(0, 1)] * 5), (4, [(1, 1), (3, 6)])], [(9, 2), (17, 1)]),
    ([], [(20, 1), (33, 4)]),  # a plain step
    ([(1, [(0, 3), (7, 1)]), (2, [(2, 1)] * 3), (3, [(0, 1), (0, 1)])], []),
    ([(5, [(9, 1)] * 8)], [(3, 3)]),
]


def test_cascade_compiles_into_one_graph_beside_the_plain_one():
    from torch_pagedkv.cache import StepPlanner
    from torch_pagedkv.cache.step_plan import ALWAYS_CASCADE
    from torch_pagedkv.layers import write_and_attend
    from paged_inputs import prefix_group_rows, random_cache

    def step(query, key, value, key_cache, value_cache, metadata):
        return write_and_attend(query, key, value, (key_cache, value_cache), metadata,
                                scale=1.0 / math.sqrt(HEAD))

    graphs = []

    def counting_backend(gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx
        compiled = compile_fx(gm, example_inputs)
        graphs.append(gm)  # after: a trace dynamo restarts does not count
        return compiled

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=counting_backend, fullgraph=True, dynamic=True)
    # One planner and one cache for every step, as an engine holds them.
    planner = StepPlanner(BLOCK, max_num_seqs=16, max_num_tokens=64, max_blocks_per_seq=12,
                          cascade=ALWAYS_CASCADE)
    g = torch.Generator().manual_seed(0)
    key_cache = random_cache(128, BLOCK, KV_HEADS, HEAD, torch.float32, "cpu", g)
    value_cache = random_cache(128, BLOCK, KV_HEADS, HEAD, torch.float32, "cpu", g)
    kinds = []
    for seed, (groups, loners) in enumerate(CASCADE_STEPS):
        rows, _ = prefix_group_rows(groups, loners, BLOCK, seed)
        meta = planner.plan(rows)
        kinds.append(meta.cascade is not None)
        n = meta.num_tokens
        query = torch.randn(n, NUM_HEADS, HEAD, generator=g)
        key = torch.randn(n, KV_HEADS, HEAD, generator=g)
        value = torch.randn(n, KV_HEADS, HEAD, generator=g)
        caches = key_cache.clone(), value_cache.clone()
        want = step(query, key, value, *caches, meta)
        with fx_config.patch(use_duck_shape=False):  # as the engine runs it (model_runner)
            got = compiled(query, key, value, key_cache, value_cache, meta)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert torch.equal(key_cache, caches[0]) and torch.equal(value_cache, caches[1])
    assert kinds == [True, True, False, True, True]
    assert len(graphs) == 2, f"{len(graphs)} graphs for one plain and four cascade steps"
    codes = "\n".join(g.code for g in graphs)
    assert "pagedkv.paged_attention_lse" in codes and "pagedkv.merge_attn_states" in codes
