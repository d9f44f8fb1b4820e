"""Shared-prefix (cascade) attention for vLLM batches.

vLLM 0.32 no longer plans cascade attention itself (its builders always get
common_prefix_len 0), so the metadata builder finds the groups: requests whose block
tables start with the same physical blocks (vLLM's prefix cache hands them out) read
those blocks once for all their query rows (`paged_attention_lse(causal=False)`), their
own blocks once each, and the two are merged (`merge_attn_states`): the engine's
`find_prefix_groups` and `cascade_attention`, on vLLM's host-side block table. Only where
it pays on this CPU (the engine's AUTO_CASCADE rule: 16+ requests sharing 256+ tokens).
"""
from __future__ import annotations

import numpy as np
import torch

from torch_pagedkv.cache.step_plan import AUTO_CASCADE, CascadeRule, find_prefix_groups
from torch_pagedkv.layers.metadata import CascadeMetadata


def plan_cascade(block_table: torch.Tensor, seq_lens: torch.Tensor, qsl: torch.Tensor,
                 block_size: int, rule: CascadeRule = AUTO_CASCADE) -> CascadeMetadata | None:
    """The cascade plan of one step (CPU tensors: block_table int32 [S, W], seq_lens int32
    [S], query_start_loc int32 [S + 1]), or None when no group meets the rule."""
    num_seqs = block_table.shape[0]
    if num_seqs < rule.min_seqs:
        return None
    table, lens, starts = block_table.numpy(), seq_lens.numpy().astype(np.int64), \
        qsl.numpy().astype(np.int64)
    q_lens = starts[1:] - starts[:-1]
    # Blocks wholly below a row's first query position; none for a row without queries.
    full = np.where(q_lens > 0, (lens - q_lens) // block_size, 0)
    groups = find_prefix_groups(table, full, block_size, rule)
    if not groups:
        return None
    members = [i for _, rows in groups for i in rows]
    in_group = np.zeros(num_seqs, dtype=bool)
    in_group[members] = True
    seq_order = np.concatenate([np.asarray(members, dtype=np.int64), np.flatnonzero(~in_group)])
    new_q = q_lens[seq_order]
    new_starts = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(new_q, out=new_starts[1:])
    rows = int(new_starts[-1])
    order = np.repeat(starts[:-1][seq_order] - new_starts[:-1], new_q) + np.arange(rows)
    restore = np.empty(rows, dtype=np.int64)
    restore[order] = np.arange(rows)
    width = table.shape[1]
    s_table = table[seq_order].copy()
    s_lens = lens[seq_order].copy()
    p_table = np.zeros((len(groups) + 1, width), dtype=np.int32)
    p_lens = np.zeros(len(groups) + 1, dtype=np.int64)
    p_qsl = np.zeros(len(groups) + 2, dtype=np.int64)
    r = 0
    for g, (shared, group_rows) in enumerate(groups):
        k = len(group_rows)
        s_table[r:r + k, :width - shared] = table[group_rows, shared:]
        s_lens[r:r + k] -= shared * block_size
        p_table[g, :shared] = table[group_rows[0], :shared]
        p_lens[g] = shared * block_size
        p_qsl[g] = new_starts[r]
        r += k
    # The last entry holds every other row: no shared keys (out 0, lse -inf).
    p_qsl[len(groups)] = new_starts[r]
    p_qsl[-1] = rows
    i32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32))  # noqa: E731
    return CascadeMetadata(
        query_order=torch.from_numpy(order), query_restore=torch.from_numpy(restore),
        prefix_block_table=i32(p_table), prefix_seq_lens=i32(p_lens),
        prefix_query_start_loc=i32(p_qsl), suffix_block_table=i32(s_table),
        suffix_seq_lens=i32(s_lens), suffix_query_start_loc=i32(new_starts),
        num_groups=len(groups), shared_tokens=tuple(s * block_size for s, _ in groups))
