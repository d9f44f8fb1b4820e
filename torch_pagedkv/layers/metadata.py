"""The per-step attention metadata: four small int tensors, passed explicitly.

The host (engine, BlockManager) plans a step into these tensors; the model hands
the same record to every PagedAttention layer. There is no global context: a
layer sees only what its forward() is given (nano-vLLM's context object, made an
argument).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class AttentionMetadata:
    """One step's tensors, for a batch of S sequences with T new tokens in total.

    slot_mapping:    int64 [T]      cache slot of each new token (negative: padding, skipped)
    block_table:     int32 [S, W]   physical blocks of each sequence, in token order
    seq_lens:        int32 [S]      context length of each sequence, its new tokens included
    query_start_loc: int32 [S + 1]  sequence i owns new tokens [qsl[i], qsl[i+1])
    """

    slot_mapping: Tensor
    block_table: Tensor
    seq_lens: Tensor
    query_start_loc: Tensor

    @classmethod
    def from_step(cls, step) -> "AttentionMetadata":
        """From any record with the four fields (e.g. cache.step_plan.StepMetadata)."""
        return cls(step.slot_mapping, step.block_table, step.seq_lens, step.query_start_loc)

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]
