"""StepPlanner: the step's four metadata tensors, checked against their
definition in docs/design.md §2 and, end to end, against dense causal attention."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_pagedkv import ops, reference
from torch_pagedkv.cache import BlockManager, StepPlanner

BS = 4


def expected(bm: BlockManager, steps):
    """The metadata by definition, as plain lists."""
    slots, rows, lens, qsl = [], [], [], [0]
    for seq_id, computed, new in steps:
        table = bm.block_table(seq_id)
        slots += [table[p // BS] * BS + p % BS for p in range(computed, computed + new)]
        rows.append(table[: -(-(computed + new) // BS)])
        lens.append(computed + new)
        qsl.append(qsl[-1] + new)
    return slots, rows, lens, qsl


def assert_matches(meta, bm, steps):
    slots, rows, lens, qsl = expected(bm, steps)
    assert meta.slot_mapping[: len(slots)].tolist() == slots
    assert meta.seq_lens[: len(lens)].tolist() == lens
    assert meta.query_start_loc[: len(qsl)].tolist() == qsl
    for i, row in enumerate(rows):
        assert meta.block_table[i, : len(row)].tolist() == row
    assert (meta.num_tokens, meta.num_seqs) == (len(slots), len(steps))


def manager_with(lengths, num_blocks=64) -> BlockManager:
    bm = BlockManager(num_blocks, BS)
    for i, n in enumerate(lengths):
        bm.allocate(i, [1000 * i + t for t in range(n)])
    return bm


def test_mixed_step_matches_the_definition():
    bm = manager_with([13, 6, 9])
    planner = StepPlanner(bm, max_num_seqs=4, max_num_tokens=32, max_blocks_per_seq=8)
    steps = [(0, 4, 9), (1, 5, 1), (2, 0, 6)]  # prefill chunk, decode, first chunk
    meta = planner.plan(steps)
    assert_matches(meta, bm, steps)
    assert meta.slot_mapping.dtype == torch.int64
    assert meta.block_table.dtype == meta.seq_lens.dtype == meta.query_start_loc.dtype == torch.int32
    assert meta.slot_mapping.shape == (16,)
    assert meta.block_table.shape == (3, 8)
    assert meta.seq_lens.shape == (3,) and meta.query_start_loc.shape == (4,)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.data()), min_size=1, max_size=6))
def test_random_steps_match_the_definition(seqs):
    bm = manager_with([n for n, _ in seqs], num_blocks=128)
    steps = []
    for i, (n, data) in enumerate(seqs):
        computed = data.draw(st.integers(0, n))
        steps.append((i, computed, data.draw(st.integers(0, n - computed))))
    planner = StepPlanner(bm, max_num_seqs=6, max_num_tokens=240, max_blocks_per_seq=10)
    assert_matches(planner.plan(steps), bm, steps)


def test_padding_gives_fixed_shapes_and_valid_rows():
    bm = manager_with([10, 7])
    planner = StepPlanner(bm, max_num_seqs=8, max_num_tokens=64, max_blocks_per_seq=8)
    steps = [(0, 0, 10), (1, 6, 1)]
    meta = planner.plan(steps, num_tokens=16, num_seqs=4)
    assert_matches(meta, bm, steps)
    assert meta.slot_mapping.shape == (16,) and meta.seq_lens.shape == (4,)
    assert meta.slot_mapping[11:].tolist() == [-1] * 5
    qsl, lens = meta.query_start_loc.tolist(), meta.seq_lens.tolist()
    assert qsl == [0, 10, 11, 11, 16]  # row 2 empty, row 3 owns the padding
    assert lens[2:] == [0, 5]
    assert all(qsl[i + 1] - qsl[i] <= lens[i] for i in range(4))
    assert meta.block_table[3, :2].tolist() == [0, 0]


def test_padding_tokens_get_a_spare_row_by_default():
    bm = manager_with([5])
    planner = StepPlanner(bm, max_num_seqs=2, max_num_tokens=8, max_blocks_per_seq=4)
    meta = planner.plan([(0, 0, 5)], num_tokens=8)
    assert meta.query_start_loc.tolist() == [0, 5, 8]
    assert meta.seq_lens.tolist() == [5, 3]


def test_no_tensor_is_allocated_per_step():
    bm = manager_with([10, 7])
    planner = StepPlanner(bm, max_num_seqs=4, max_num_tokens=32, max_blocks_per_seq=8)
    first = planner.plan([(0, 0, 10), (1, 0, 7)], num_tokens=20, num_seqs=4)
    second = planner.plan([(0, 9, 1), (1, 6, 1)], num_tokens=20, num_seqs=4)
    for a, b in zip(
        (first.slot_mapping, first.block_table, first.seq_lens, first.query_start_loc),
        (second.slot_mapping, second.block_table, second.seq_lens, second.query_start_loc),
    ):
        assert a.data_ptr() == b.data_ptr() and a.shape == b.shape


@pytest.mark.parametrize(
    "kwargs, steps, match",
    [
        ({}, [(0, 0, 11)], "at most its 10 tokens"),
        ({}, [(0, -1, 2)], ">= 0"),
        ({}, [(0, 0, 10)] * 5, "max_num_seqs"),
        ({"num_tokens": 9}, [(0, 0, 10)], r"num_tokens=9 must be in \[10, 32\]"),
        ({"num_tokens": 12, "num_seqs": 1}, [(0, 0, 10)], "spare sequence row"),
        ({"num_seqs": 5}, [(0, 0, 10)], "max_num_seqs"),
    ],
)
def test_bad_steps_are_rejected_and_leave_the_last_plan_intact(kwargs, steps, match):
    bm = manager_with([10])
    planner = StepPlanner(bm, max_num_seqs=4, max_num_tokens=32, max_blocks_per_seq=8)
    good = planner.plan([(0, 0, 10)])
    before = good.slot_mapping.tolist(), good.query_start_loc.tolist()
    with pytest.raises(ValueError, match=match):
        planner.plan(steps, **kwargs)
    assert (good.slot_mapping.tolist(), good.query_start_loc.tolist()) == before


def test_too_long_for_the_table_width_is_rejected():
    bm = manager_with([20])
    planner = StepPlanner(bm, max_num_seqs=2, max_num_tokens=32, max_blocks_per_seq=4)
    with pytest.raises(ValueError, match="max_blocks_per_seq"):
        planner.plan([(0, 0, 20)])
    with pytest.raises(KeyError, match="unknown sequence"):
        planner.plan([(7, 0, 1)])


def test_rows_may_name_a_block_table_handle_or_block_ids():
    """The engine passes each Sequence's BlockTable, the HF paths plain block ids:
    the same plan as naming the sequence id."""
    bm = manager_with([13, 6])
    steps = [(0, 4, 9), (1, 5, 1)]
    by_id = StepPlanner(bm, max_num_seqs=4, max_num_tokens=32, max_blocks_per_seq=8)
    by_handle = StepPlanner(bm, max_num_seqs=4, max_num_tokens=32, max_blocks_per_seq=8)
    by_blocks = StepPlanner(BS, max_num_seqs=4, max_num_tokens=32, max_blocks_per_seq=8)
    expect = by_id.plan(steps)
    for planner, rows in (
        (by_handle, [(bm.table(s), c, n) for s, c, n in steps]),
        (by_blocks, [(bm.block_table(s), c, n) for s, c, n in steps]),
    ):
        meta = planner.plan(rows)
        assert_matches(meta, bm, steps)
        assert torch.equal(meta.block_table[:, :4], expect.block_table[:, :4])


def test_a_block_table_handle_follows_its_sequence():
    bm = manager_with([6])
    handle = bm.table(0)
    assert (handle.block_ids, handle.num_tokens, handle.num_committed) == ([0, 1], 6, 0)
    bm.append(0, [7, 8, 9])
    bm.commit(0, 8)
    assert (handle.block_ids, handle.num_tokens, handle.num_committed) == ([0, 1, 2], 9, 8)


def test_rows_with_fewer_queries_than_new_tokens():
    """(blocks, computed, new, num_queries): every new token gets a slot, only the last
    num_queries are query rows (the dense HF fallback writes a whole context, queries
    only its last tokens)."""
    bm = manager_with([10, 7])
    planner = StepPlanner(bm, max_num_seqs=4, max_num_tokens=32, max_blocks_per_seq=8)
    meta = planner.plan([(0, 0, 10, 1), (1, 0, 7, 3)])
    assert meta.slot_mapping.shape == (17,) and meta.num_tokens == 17
    assert meta.query_start_loc.tolist() == [0, 1, 4]
    assert meta.seq_lens.tolist() == [10, 7]
    with pytest.raises(ValueError, match="num_queries=8 must be in"):
        planner.plan([(0, 0, 7, 8)])


def test_a_planner_without_a_block_manager_rejects_sequence_ids():
    planner = StepPlanner(BS, max_num_seqs=2, max_num_tokens=8, max_blocks_per_seq=4)
    with pytest.raises(ValueError, match="has no BlockManager"):
        planner.plan([("seq-0", 0, 1)])


# ------------------------------------------------------------ end to end
H, D = 2, 8


def kv_of(tokens, positions, table):
    """Deterministic K and V of (token, position): equal prefixes, equal K/V."""
    idx = torch.tensor(tokens) * 131 + torch.tensor(positions)
    return table[0][idx % 997], table[1][idx % 997]


def test_planned_steps_drive_the_ops_like_dense_attention():
    """Chunked prefill over a reused prefix, then decode, padded every step:
    paged attention equals dense causal attention over each whole sequence."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(2, 997, H, D, generator=g)
    queries = torch.randn(997, H, D, generator=g)
    kc = torch.zeros(32, BS, H, D)
    vc = torch.zeros(32, BS, H, D)
    bm = BlockManager(32, BS)
    planner = StepPlanner(bm, max_num_seqs=4, max_num_tokens=16, max_blocks_per_seq=10)

    system = list(range(50, 59))
    prompts = {0: system + [1, 2, 3], 1: system + [4, 5, 6, 7, 8]}
    tokens = {s: list(p) for s, p in prompts.items()}
    computed = {0: bm.allocate(0, prompts[0])}
    for step_index in range(8):
        if step_index == 2:  # seq 0 has committed 10 tokens: 2 full blocks
            computed[1] = bm.allocate(1, prompts[1])
            assert computed[1] == 8  # both are system-prompt blocks, reused
        step = []
        for s in computed:
            if computed[s] == len(tokens[s]):  # prompt done: decode a new token
                tokens[s].append(100 + step_index)
                bm.append(s, tokens[s][-1:])
            step.append((s, computed[s], min(5, len(tokens[s]) - computed[s])))
        meta = planner.plan(step, num_tokens=16, num_seqs=4)
        new_tokens = [tokens[s][p] for s, c, n in step for p in range(c, c + n)]
        new_pos = [p for s, c, n in step for p in range(c, c + n)]
        k, v = kv_of(new_tokens, new_pos, table)
        pad = 16 - len(new_tokens)
        k, v = (torch.cat([x, torch.zeros(pad, H, D)]) for x in (k, v))
        q = torch.cat([queries[torch.tensor(new_tokens) % 997], torch.zeros(pad, H, D)])
        ops.reshape_and_cache(k, v, kc, vc, meta.slot_mapping)
        out = ops.paged_attention(
            q, kc, vc, meta.block_table, meta.seq_lens, meta.query_start_loc, 1 / math.sqrt(D)
        )
        row = 0
        for s, c, n in step:
            kd, vd = kv_of(tokens[s][: c + n], list(range(c + n)), table)
            qd = queries[torch.tensor(tokens[s][: c + n]) % 997]
            dense = reference.paged_attention(
                qd,
                kd.unsqueeze(1),
                vd.unsqueeze(1),
                torch.arange(c + n, dtype=torch.int32).view(1, -1),
                torch.tensor([c + n], dtype=torch.int32),
                torch.tensor([0, c + n], dtype=torch.int32),
                1 / math.sqrt(D),
            )
            torch.testing.assert_close(out[row : row + n], dense[c : c + n])
            row += n
            computed[s] = c + n
            bm.commit(s, c + n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_target_uses_pinned_host_buffers_and_device_views():
    bm = manager_with([10, 7])
    planner = StepPlanner(bm, max_num_seqs=4, max_num_tokens=32, max_blocks_per_seq=8, device="cuda")
    assert all(t.is_pinned() for t in planner._host)
    steps = [(0, 0, 10), (1, 6, 1)]
    for _ in range(3):
        meta = planner.plan(steps, num_tokens=16, num_seqs=4)
        assert meta.slot_mapping.device.type == "cuda"
        assert_matches(meta, bm, steps)


# ------------------------------------------------------------------ cascade groups

def test_prefix_groups_share_blocks_below_every_members_first_query():
    from torch_pagedkv.cache.step_plan import CascadeRule, find_prefix_groups
    table = np.array([
        [7, 8, 9, 1, 0],   # 0: family A, 3 blocks before its query
        [3, 4, 5, 6, 0],   # 1: family B
        [7, 8, 9, 2, 0],   # 2: A
        [7, 8, 5, 5, 0],   # 3: A's first two blocks, then its own
        [3, 4, 5, 6, 11],  # 4: B, 4 blocks before its query
        [7, 8, 9, 9, 9],   # 5: A, but its queries start in block 2
        [3, 0, 0, 0, 0],   # 6: no query rows
        [9, 9, 9, 9, 9],   # 7: alone
    ])
    full = np.array([3, 3, 3, 4, 4, 2, 0, 4])
    rule = CascadeRule(min_seqs=2, min_shared_tokens=1)
    # A: all four share blocks 7, 8 (saving (4 - 1) * 2 reads beats (2 - 1) * 3 for rows
    # 0 and 2 alone); B: rows 1 and 4 share 3 blocks (row 1's queries start after them).
    assert find_prefix_groups(table, full, 4, rule) == [(2, [0, 2, 3, 5]), (3, [1, 4])]
    # Needing 3 members keeps A; needing 12 tokens (3 blocks of 4) keeps B, then rows 0
    # and 2, which the 2-block group would have taken.
    assert find_prefix_groups(table, full, 4, CascadeRule(3, 1)) == [(2, [0, 2, 3, 5])]
    assert find_prefix_groups(table, full, 4, CascadeRule(2, 12)) == [(3, [0, 2]), (3, [1, 4])]
    assert find_prefix_groups(table, full, 4, CascadeRule(2, 20)) == []


def test_cascade_plan_orders_rows_and_keeps_shapes():
    """Group members' query rows first (in cascade order), prefix entries of fixed count,
    suffixes that skip the shared blocks; no cascade below the rule."""
    from torch_pagedkv.cache.step_plan import ALWAYS_CASCADE
    prefix = [40, 41]
    rows = [(prefix + [1, 2], 9, 1),       # member, decode at position 9
            ([50, 51, 52], 10, 2),        # loner, 2 query rows
            (prefix + [3], 8, 3),         # member, a 3-token chunk from position 8
            ([60], 1, 1)]                 # loner
    planner = StepPlanner(4, max_num_seqs=6, max_num_tokens=16, max_blocks_per_seq=5,
                          cascade=ALWAYS_CASCADE)
    meta = planner.plan(rows, num_tokens=10, num_seqs=5)  # 3 padding tokens, a spare row
    c = meta.cascade
    assert c is not None and c.num_groups == 1 and c.shared_tokens == (8,)
    # Query rows: seq 0 -> [0], seq 1 -> [1, 2], seq 2 -> [3, 4, 5], seq 3 -> [6], pad [7, 9]
    assert c.query_order.tolist() == [0, 3, 4, 5, 1, 2, 6, 7, 8, 9]
    assert c.query_order[c.query_restore].tolist() == list(range(10))
    assert c.prefix_block_table.shape == (6 // 2 + 1, 5)  # fixed: most groups + the rest
    assert c.prefix_block_table[0, :2].tolist() == prefix
    assert c.prefix_seq_lens.tolist() == [8, 0, 0, 0]
    assert c.prefix_query_start_loc.tolist() == [0, 4, 10, 10, 10]
    # Suffixes in cascade order: seq 0 and seq 2 less their 8 shared tokens, then seq 1,
    # seq 3 and the spare row holding the 3 padding queries.
    assert c.suffix_seq_lens.tolist() == [10 - 8, 11 - 8, 12, 2, 3]
    assert c.suffix_block_table[0, :1].tolist() == [1]
    assert c.suffix_block_table[1, :1].tolist() == [3]
    assert c.suffix_query_start_loc.tolist() == [0, 1, 4, 6, 7, 10]
    # The same step without a group: no cascade.
    alone = [(prefix + [1, 2], 9, 1), ([50, 51, 52], 10, 2)]
    assert planner.plan(alone).cascade is None
    # A member whose queries start inside the shared blocks sees only part of them.
    early = [(prefix + [1], 9, 1), (prefix + [3], 3, 1)]
    assert planner.plan(early).cascade is None
