"""Turn a scheduled step into the AttentionMetadata the compiled model consumes.

The one planner of the package: the engine (engine/model_runner.py), HF's generate
through PagedCache and the dense fallback of the "pagedkv" attention function
(integrations/) all plan here. The host plans, the device only runs (FlashInfer's
plan/run split): a ``StepPlanner`` owns one set of host buffers and one set of device
buffers, both allocated once at their maximum size. ``plan`` fills the host buffers
in place, copies the used part to the device with ``non_blocking=True`` (the host
buffers are pinned when the target is CUDA) and returns an ``AttentionMetadata`` of
views of the device buffers sized to the step. No tensor is allocated per step, and
the returned views always start at the same addresses, which is what CUDA graphs need.

A step is a list of rows ``(blocks, num_computed, num_new[, num_queries])``: the
sequence's tokens ``[num_computed, num_computed + num_new)`` are new (their K/V get
slots), and the last ``num_queries`` of them (default: all) are query rows. ``blocks``
is the sequence's ``BlockTable`` handle (what the engine's ``Sequence.block_table``
holds), a list of block ids, or a sequence id of the planner's ``BlockManager``.

Shapes, for a step of ``S`` sequences, ``T`` new tokens and ``Q`` query rows:

* ``slot_mapping``    int64 ``[T]``: cache slot of each new token;
* ``block_table``     int32 ``[S, max_blocks_per_seq]``: full width always;
  entries past ``ceil(seq_lens[i] / block_size)`` hold stale ids (the op
  ignores them);
* ``seq_lens``        int32 ``[S]``: ``num_computed + num_new``;
* ``query_start_loc`` int32 ``[S + 1]``: prefix sums of ``num_queries``.

Padding to fixed shapes. A compiled model (or a captured CUDA graph) wants
the same shapes every step, so ``plan`` can pad to ``num_tokens >= T`` and
``num_seqs >= S`` (e.g. the next bucket size):

* padding tokens get slot ``-1`` (``reshape_and_cache`` skips them);
* padding sequence rows get ``seq_len = 0`` and ``q_len = 0``, except the
  last row, which owns the ``num_tokens - T`` padding query rows so that
  ``query_start_loc[-1] == Q + num_tokens - T`` as the op requires: its
  ``seq_len = q_len = num_tokens - T`` and its block-table entries are 0, so
  the padding queries attend (harmlessly, read-only) to block 0 and their
  outputs are garbage to be dropped: use ``out[:meta.num_tokens]``.

Padding tokens therefore need a spare row: ``num_tokens > T`` requires
``num_seqs > S`` (by default ``num_seqs`` is ``S``, or ``S + 1`` when tokens
are padded). Size ``max_num_seqs`` to include that spare row.

The returned tensors are overwritten by the next ``plan`` call.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Optional, Union

import numpy as np
import torch

from ..layers.metadata import AttentionMetadata
from .block_manager import BlockManager, BlockTable

__all__ = ["StepPlanner", "StepRow"]

Blocks = Union[BlockTable, Sequence[int], np.ndarray, Hashable]
StepRow = Union[tuple[Blocks, int, int], tuple[Blocks, int, int, int]]


class StepPlanner:
    """Plans steps into preallocated buffers (see the module docstring)."""

    def __init__(
        self,
        block_manager: Union[BlockManager, int],
        *,
        max_num_seqs: int,
        max_num_tokens: int,
        max_blocks_per_seq: int,
        device: torch.device | str = "cpu",
        pin_memory: bool = True,
    ) -> None:
        """``block_manager``: the manager whose sequence ids rows may name, or just
        the block size when rows carry their blocks themselves."""
        if min(max_num_seqs, max_num_tokens, max_blocks_per_seq) < 1:
            raise ValueError(
                "max_num_seqs, max_num_tokens and max_blocks_per_seq must be >= 1, got "
                f"{max_num_seqs}, {max_num_tokens}, {max_blocks_per_seq}"
            )
        if isinstance(block_manager, BlockManager):
            self.block_manager: Optional[BlockManager] = block_manager
            self.block_size = block_manager.block_size
        else:
            self.block_manager = None
            self.block_size = int(block_manager)
        self.max_num_seqs = max_num_seqs
        self.max_num_tokens = max_num_tokens
        self.max_blocks_per_seq = max_blocks_per_seq
        self.device = torch.device(device)
        on_device = self.device.type != "cpu"
        pin = pin_memory and self.device.type == "cuda" and torch.cuda.is_available()

        def host(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, pin_memory=pin)

        self._host = (
            host(max_num_tokens, dtype=torch.int64),
            host(max_num_seqs, max_blocks_per_seq, dtype=torch.int32),
            host(max_num_seqs, dtype=torch.int32),
            host(max_num_seqs + 1, dtype=torch.int32),
        )
        self._dev = (
            tuple(torch.zeros_like(t, device=self.device) for t in self._host)
            if on_device
            else self._host
        )
        # numpy views share the host memory: element writes without tensor ops.
        self._slot, self._table, self._lens, self._qsl = (t.numpy() for t in self._host)
        max_len = max_blocks_per_seq * self.block_size
        self._positions = np.arange(max_len, dtype=np.int64)
        # The next plan must not overwrite host memory an in-flight copy reads.
        self._copied = torch.cuda.Event() if pin else None
        self._copy_pending = False

    def _blocks_of(self, blocks: Blocks) -> tuple[Sequence[int], int]:
        """(block ids, tokens the sequence holds) of a row's ``blocks``."""
        if isinstance(blocks, BlockTable):
            return blocks.block_ids, blocks.num_tokens
        if isinstance(blocks, (list, range, np.ndarray)):
            return blocks, len(blocks) * self.block_size
        if self.block_manager is None:
            raise ValueError(
                f"row names sequence {blocks!r}, but this planner has no BlockManager: "
                "pass its BlockTable or its block ids"
            )
        table = self.block_manager.table(blocks)  # raises on an unknown id
        return table.block_ids, table.num_tokens

    def plan(
        self,
        steps: Sequence[StepRow],
        *,
        num_tokens: int | None = None,
        num_seqs: int | None = None,
    ) -> AttentionMetadata:
        """Fill the metadata for ``steps`` (rows ``(blocks, num_computed, num_new[,
        num_queries])``); pad to ``num_tokens`` / ``num_seqs`` if given."""
        bs = self.block_size
        width = self.max_blocks_per_seq
        n_seqs = len(steps)
        if n_seqs > self.max_num_seqs:
            raise ValueError(f"{n_seqs} sequences in a step, max_num_seqs is {self.max_num_seqs}")
        # Check everything before writing anything: a rejected step leaves the
        # previous step's tensors intact.
        rows = []
        t = q = 0
        for i, (blocks, computed, new, *queries) in enumerate(steps):
            block_ids, total = self._blocks_of(blocks)
            seq_len = computed + new
            if computed < 0 or new < 0 or seq_len > total:
                raise ValueError(
                    f"step row {i}: num_computed_tokens={computed}, "
                    f"num_new_tokens={new} must be >= 0 and sum to at most its "
                    f"{total} tokens (append them first)"
                )
            n_q = queries[0] if queries else new
            if not 0 <= n_q <= new:
                raise ValueError(f"step row {i}: num_queries={n_q} must be in [0, {new}]")
            used = -(-seq_len // bs)
            if used > width:
                raise ValueError(
                    f"step row {i} needs {used} blocks for {seq_len} tokens, "
                    f"max_blocks_per_seq is {width}"
                )
            rows.append((block_ids, computed, new, seq_len, used, n_q))
            t += new
            q += n_q
        n_tokens = t if num_tokens is None else num_tokens
        pad_tokens = n_tokens - t
        if num_seqs is None:
            num_seqs = n_seqs + (pad_tokens > 0)
        if not t <= n_tokens <= self.max_num_tokens:
            raise ValueError(
                f"num_tokens={n_tokens} must be in [{t}, {self.max_num_tokens}] "
                "(the step's new tokens, max_num_tokens)"
            )
        if not n_seqs <= num_seqs <= self.max_num_seqs:
            raise ValueError(
                f"num_seqs={num_seqs} must be in [{n_seqs}, {self.max_num_seqs}] "
                "(the step's sequences, max_num_seqs)"
            )
        if pad_tokens and num_seqs == n_seqs:
            raise ValueError(
                f"padding {pad_tokens} tokens needs a spare sequence row to own them: "
                f"pass num_seqs > {n_seqs}"
            )
        pad_blocks = -(-pad_tokens // bs)
        if pad_blocks > width:
            raise ValueError(
                f"{pad_tokens} padding tokens need {pad_blocks} blocks, "
                f"max_blocks_per_seq is {width}"
            )

        if self._copy_pending:  # the last copy must be done reading the host buffers
            self._copied.synchronize()
            self._copy_pending = False
        slot, table, positions = self._slot, self._table, self._positions
        lens: list[int] = []
        starts = [0]
        t = q = 0
        for i, (block_ids, computed, new, seq_len, used, n_q) in enumerate(rows):
            table[i, :used] = block_ids[:used]
            if new == 1:  # decode: skip the array arithmetic
                slot[t] = block_ids[computed // bs] * bs + computed % bs
            elif new:
                pos = positions[computed:seq_len]
                slot[t : t + new] = table[i, pos // bs].astype("int64") * bs + pos % bs
            t += new
            q += n_q
            lens.append(seq_len)
            starts.append(q)

        self._lens[:n_seqs] = lens
        self._qsl[: n_seqs + 1] = starts
        if num_seqs > n_seqs:
            slot[t:n_tokens] = -1
            self._lens[n_seqs:num_seqs] = 0
            self._qsl[n_seqs + 1 : num_seqs + 1] = q
            self._lens[num_seqs - 1] = pad_tokens
            self._qsl[num_seqs] = q + pad_tokens
            table[num_seqs - 1, :pad_blocks] = 0

        sizes = (n_tokens, num_seqs, num_seqs, num_seqs + 1)
        if self._dev is not self._host:
            for dev, host, n in zip(self._dev, self._host, sizes):
                dev[:n].copy_(host[:n], non_blocking=True)
            if self._copied is not None:
                self._copied.record()
                self._copy_pending = True
        slot_mapping, block_table, seq_lens, qsl = (
            buf[:n] for buf, n in zip(self._dev, sizes)
        )
        return AttentionMetadata(slot_mapping, block_table, seq_lens, qsl, t, n_seqs)
