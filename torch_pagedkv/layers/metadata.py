"""AttentionMetadata: one step's facts for every attention layer, passed explicitly.

The one record of a step. ``StepPlanner.plan`` (cache/step_plan.py) fills it on the
host; the model hands it to every attention layer, whose ``write_and_attend``
(layers/attention.py) is the one place that reads it. There is no global context: a
layer sees only what its forward() is given (nano-vLLM's context object, made an
argument). Later additions (cascade groups, graph padding) are optional fields here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor


@dataclass
class AttentionMetadata:
    """One step's tensors, for a batch of S sequence rows with T new tokens in total.

    slot_mapping:    int64 [T]      cache slot of each new token (negative: padding, skipped)
    block_table:     int32 [S, W]   physical blocks of each sequence, in token order
    seq_lens:        int32 [S]      context length of each sequence, its new tokens included
    query_start_loc: int32 [S + 1]  sequence i owns query rows [qsl[i], qsl[i+1])
    num_tokens:      real new tokens, before any padding (default: T)
    num_seqs:        real sequences, before any padding (default: S)

    The two counts are host ints for the host (trace, tests, the runner); compiled code
    must read sizes from the tensors, never from them, so they never become guards.
    """

    slot_mapping: Tensor
    block_table: Tensor
    seq_lens: Tensor
    query_start_loc: Tensor
    num_tokens: Optional[int] = None
    num_seqs: Optional[int] = None

    def __post_init__(self) -> None:
        if self.num_tokens is None:
            self.num_tokens = self.slot_mapping.shape[0]
        if self.num_seqs is None:
            self.num_seqs = self.seq_lens.shape[0]
