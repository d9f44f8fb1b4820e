"""AttentionMetadata: one step's facts for every attention layer, passed explicitly.

The one record of a step. ``StepPlanner.plan`` (cache/step_plan.py) fills it on the
host; the model hands it to every attention layer, whose ``write_and_attend``
(layers/attention.py) is the one place that reads it. There is no global context: a
layer sees only what its forward() is given (nano-vLLM's context object, made an
argument). Optional parts of a step are optional fields here: ``cascade`` holds the
shared-prefix groups the planner found (CascadeMetadata), None on a plain step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor


@dataclass
class CascadeMetadata:
    """Shared-prefix (cascade) attention of one step: groups of sequences whose block
    tables start with the same physical blocks read those blocks once for all their
    query rows (docs/design.md §2, paged_attention_lse).

    The two passes run in "cascade order": the query rows of each group's members,
    group after group, then every other row (padding included). With Q query rows,
    S sequence rows and room for P prefix entries (a fixed count, so shapes do not
    change with the groups):

    query_order:            int64 [Q]      cascade-order row r is query row query_order[r]
    query_restore:          int64 [Q]      its inverse: query row i is at query_restore[i]
    prefix_block_table:     int32 [P, W]   entry g < G: group g's shared blocks
    prefix_seq_lens:        int32 [P]      shared tokens of each group; 0 for the entry
                                           holding the other rows and for unused entries
    prefix_query_start_loc: int32 [P + 1]  group g owns cascade-order rows [qsl[g], qsl[g+1])
    suffix_block_table:     int32 [S, W]   each sequence's blocks after its group's prefix
    suffix_seq_lens:        int32 [S]      its tokens after the prefix (all, outside groups)
    suffix_query_start_loc: int32 [S + 1]  in cascade order
    num_groups:             host int, the groups planned (for the host: trace, tests)
    shared_tokens:          host tuple, each group's shared prefix length in tokens
    """

    query_order: Tensor
    query_restore: Tensor
    prefix_block_table: Tensor
    prefix_seq_lens: Tensor
    prefix_query_start_loc: Tensor
    suffix_block_table: Tensor
    suffix_seq_lens: Tensor
    suffix_query_start_loc: Tensor
    num_groups: int = 0
    shared_tokens: tuple[int, ...] = ()


@dataclass
class AttentionMetadata:
    """One step's tensors, for a batch of S sequence rows with T new tokens in total.

    slot_mapping:    int64 [T]      cache slot of each new token (negative: padding, skipped)
    block_table:     int32 [S, W]   physical blocks of each sequence, in token order
    seq_lens:        int32 [S]      context length of each sequence, its new tokens included
    query_start_loc: int32 [S + 1]  sequence i owns query rows [qsl[i], qsl[i+1])
    num_tokens:      real new tokens, before any padding (default: T)
    num_seqs:        real sequences, before any padding (default: S)
    cascade:         the step's shared-prefix groups, or None: plain attention

    The two counts are host ints for the host (trace, tests, the runner); compiled code
    must read sizes from the tensors, never from them, so they never become guards.
    """

    slot_mapping: Tensor
    block_table: Tensor
    seq_lens: Tensor
    query_start_loc: Tensor
    num_tokens: Optional[int] = None
    num_seqs: Optional[int] = None
    cascade: Optional[CascadeMetadata] = None

    def __post_init__(self) -> None:
        if self.num_tokens is None:
            self.num_tokens = self.slot_mapping.shape[0]
        if self.num_seqs is None:
            self.num_seqs = self.seq_lens.shape[0]
