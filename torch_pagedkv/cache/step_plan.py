"""Turn a scheduled step into the metadata tensors the compiled model consumes.

The host plans, the device only runs (FlashInfer's plan/run split): a
``StepPlanner`` owns one set of host buffers and one set of device buffers,
both allocated once at their maximum size. ``plan`` fills the host buffers in
place from the block manager's tables, copies the used part to the device
with ``non_blocking=True`` (the host buffers are pinned when the target is
CUDA) and returns views of the device buffers sized to the step. No tensor is
allocated per step, and the returned views always start at the same
addresses, which is what CUDA graphs need.

Shapes, for a step of ``S`` sequences and ``T`` new tokens:

* ``slot_mapping``    int64 ``[T]``: cache slot of each new token;
* ``block_table``     int32 ``[S, max_blocks_per_seq]``: full width always;
  entries past ``ceil(seq_lens[i] / block_size)`` hold stale ids (the op
  ignores them);
* ``seq_lens``        int32 ``[S]``: ``num_computed_tokens + num_new_tokens``;
* ``query_start_loc`` int32 ``[S + 1]``: prefix sums of ``num_new_tokens``.

Padding to fixed shapes. A compiled model (or a captured CUDA graph) wants
the same shapes every step, so ``plan`` can pad to ``num_tokens >= T`` and
``num_seqs >= S`` (e.g. the next bucket size):

* padding tokens get slot ``-1`` (``reshape_and_cache`` skips them);
* padding sequence rows get ``seq_len = 0`` and ``q_len = 0``, except the
  last row, which owns the ``num_tokens - T`` padding query rows so that
  ``query_start_loc[-1] == num_tokens`` as the op requires: its
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
from dataclasses import dataclass

import torch

from .block_manager import BlockManager

__all__ = ["StepMetadata", "StepPlanner"]


@dataclass
class StepMetadata:
    """One step's metadata, views into the planner's device buffers."""

    slot_mapping: torch.Tensor  # int64 [num_tokens] (padded)
    block_table: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq] (padded)
    seq_lens: torch.Tensor  # int32 [num_seqs] (padded)
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1] (padded)
    num_tokens: int  # real new tokens, before padding
    num_seqs: int  # real sequences, before padding


class StepPlanner:
    """Plans steps for one ``BlockManager`` into preallocated buffers."""

    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_tokens: int,
        max_blocks_per_seq: int,
        device: torch.device | str = "cpu",
    ) -> None:
        if min(max_num_seqs, max_num_tokens, max_blocks_per_seq) < 1:
            raise ValueError(
                "max_num_seqs, max_num_tokens and max_blocks_per_seq must be >= 1, got "
                f"{max_num_seqs}, {max_num_tokens}, {max_blocks_per_seq}"
            )
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_tokens = max_num_tokens
        self.max_blocks_per_seq = max_blocks_per_seq
        self.device = torch.device(device)
        on_device = self.device.type != "cpu"
        pin = self.device.type == "cuda" and torch.cuda.is_available()

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
        max_len = max_blocks_per_seq * block_manager.block_size
        self._positions = torch.arange(max_len, dtype=torch.int64).numpy()
        # The next plan must not overwrite host memory an in-flight copy reads.
        self._copied = torch.cuda.Event() if self.device.type == "cuda" else None
        self._copy_pending = False

    def plan(
        self,
        steps: Sequence[tuple[Hashable, int, int]],
        *,
        num_tokens: int | None = None,
        num_seqs: int | None = None,
    ) -> StepMetadata:
        """Fill the metadata for ``steps`` of ``(seq_id, num_computed_tokens,
        num_new_tokens)``; pad to ``num_tokens`` / ``num_seqs`` if given."""
        bm = self.block_manager
        bs = bm.block_size
        width = self.max_blocks_per_seq
        n_seqs = len(steps)
        if n_seqs > self.max_num_seqs:
            raise ValueError(f"{n_seqs} sequences in a step, max_num_seqs is {self.max_num_seqs}")
        # Check everything before writing anything: a rejected step leaves the
        # previous step's tensors intact.
        rows = []
        t = 0
        for seq_id, computed, new in steps:
            seq_len = computed + new
            total = bm.num_tokens(seq_id)  # raises on an unknown id
            if computed < 0 or new < 0 or seq_len > total:
                raise ValueError(
                    f"sequence {seq_id!r}: num_computed_tokens={computed}, "
                    f"num_new_tokens={new} must be >= 0 and sum to at most its "
                    f"{total} tokens (append them first)"
                )
            used = -(-seq_len // bs)
            if used > width:
                raise ValueError(
                    f"sequence {seq_id!r} needs {used} blocks for {seq_len} tokens, "
                    f"max_blocks_per_seq is {width}"
                )
            rows.append((bm._seq(seq_id).block_ids, computed, new, seq_len, used))
            t += new
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
        t = 0
        for i, (block_ids, computed, new, seq_len, used) in enumerate(rows):
            table[i, :used] = block_ids[:used]
            if new == 1:  # decode: skip the array arithmetic
                slot[t] = block_ids[computed // bs] * bs + computed % bs
            elif new:
                pos = positions[computed:seq_len]
                slot[t : t + new] = table[i, pos // bs].astype("int64") * bs + pos % bs
            t += new
            lens.append(seq_len)
            starts.append(t)

        self._lens[:n_seqs] = lens
        self._qsl[: n_seqs + 1] = starts
        if num_seqs > n_seqs:
            slot[t:n_tokens] = -1
            self._lens[n_seqs:num_seqs] = 0
            self._qsl[n_seqs + 1 : num_seqs + 1] = t
            self._lens[num_seqs - 1] = pad_tokens
            self._qsl[num_seqs] = n_tokens
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
        return StepMetadata(slot_mapping, block_table, seq_lens, qsl, t, n_seqs)
