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

Cascade (shared-prefix) attention. A planner made with a ``CascadeRule`` also looks
for groups of rows whose block tables start with the same physical blocks, shared
below every member's first query row (so each member sees the whole shared prefix):
at least ``rule.min_seqs`` rows sharing at least ``rule.min_shared_tokens`` tokens of
full blocks. When it finds one, the metadata's ``cascade`` field (CascadeMetadata)
says how to read each group's prefix once for all its rows (layers/attention.py);
otherwise ``cascade`` is None and the step is plain. Its tensors have fixed shapes
too (``max_num_seqs // rule.min_seqs + 1`` prefix entries), so a compiled model
sees one cascade graph whatever the groups.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from ..cpu_tuning.choices import CascadeChoice
from ..layers.metadata import AttentionMetadata, CascadeMetadata
from .block_manager import BlockManager, BlockTable

__all__ = ["StepPlanner", "StepRow", "CascadeRule", "AUTO_CASCADE", "ALWAYS_CASCADE",
           "find_prefix_groups"]

Blocks = Union[BlockTable, Sequence[int], np.ndarray, Hashable]
StepRow = Union[tuple[Blocks, int, int], tuple[Blocks, int, int, int]]


@dataclass(frozen=True)
class CascadeRule:
    """When shared prefixes run as cascade attention: a group needs at least
    ``min_seqs`` rows sharing at least ``min_shared_tokens`` tokens of full blocks."""

    min_seqs: int
    min_shared_tokens: int

    def __post_init__(self) -> None:
        if self.min_seqs < 2 or self.min_shared_tokens < 1:
            raise ValueError(f"a cascade group needs min_seqs >= 2 and min_shared_tokens >= 1, "
                             f"got {self.min_seqs} and {self.min_shared_tokens}")


# The documented default of LLM(enable_cascade=None) (cpu_tuning/choices.py CascadeChoice,
# where it was measured; the engine asks the CPU tuning table, which measures it on the
# CPU that runs it). vLLM's GPU rule is 8 requests / 256 tokens.
AUTO_CASCADE = CascadeRule(min_seqs=CascadeChoice().min_seqs,
                           min_shared_tokens=CascadeChoice().min_shared_tokens)
# LLM(enable_cascade=True): every group of 2+ rows sharing 1+ full blocks (tests).
ALWAYS_CASCADE = CascadeRule(min_seqs=2, min_shared_tokens=1)


def find_prefix_groups(table: np.ndarray, full: np.ndarray, block_size: int,
                       rule: CascadeRule) -> list[tuple[int, list[int]]]:
    """Groups of rows that share their first blocks, as (shared blocks, row indices).

    ``table[i]``: row i's block ids; ``full[i]``: how many of them lie wholly below the
    row's first query (0 for a row without queries). Only those may be shared: every
    member's queries must see the whole prefix. Rows are bucketed by their first block;
    in a bucket, the member reaching furthest is the reference, and the shared length L
    is the one saving the most prefix reads, (members - 1) * L, among those meeting the
    rule (a reference that forms no group is set aside). Members that share less are
    left to form a group of their own, or stay plain.
    A row is in at most one group; groups come in the order of their first row, each
    member list in row order.
    """
    min_blocks = -(-rule.min_shared_tokens // block_size)
    rows = np.flatnonzero(full >= min_blocks)
    if len(rows) < rule.min_seqs:
        return []
    firsts = table[rows, 0]
    if (firsts == firsts[0]).all():  # the common case: one bucket
        buckets = [rows]
    else:
        _, bucket, counts = np.unique(firsts, return_inverse=True, return_counts=True)
        buckets = [rows[bucket == b] for b in np.flatnonzero(counts >= rule.min_seqs)]
    groups = []
    for members in buckets:
        while len(members) >= rule.min_seqs:
            reach = full[members]
            ref = members[np.argmax(reach)]
            limit = int(reach.max())
            differ = table[members, :limit] != table[ref, :limit]
            first_diff = np.where(differ.any(axis=1), differ.argmax(axis=1), limit)
            shared = np.minimum(first_diff, reach)
            best, best_saving = 0, 0
            for count, length in enumerate(sorted(shared.tolist(), reverse=True), start=1):
                # count rows share at least length blocks (ties: the last one counts all)
                if (length >= min_blocks and count >= rule.min_seqs
                        and (count - 1) * length > best_saving):
                    best, best_saving = length, (count - 1) * length
            if not best:  # the reference shares too little: try without it
                members = members[members != ref]
                continue
            groups.append((best, members[shared >= best].tolist()))
            members = members[shared < best]
    groups.sort(key=lambda g: g[1][0])
    return groups


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
        cascade: Optional[CascadeRule] = None,
    ) -> None:
        """``block_manager``: the manager whose sequence ids rows may name, or just
        the block size when rows carry their blocks themselves. ``cascade``: plan
        shared-prefix groups by this rule (None: never)."""
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
        pin = pin_memory and self.device.type == "cuda" and torch.cuda.is_available()

        def host(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, pin_memory=pin)

        self._host = (
            host(max_num_tokens, dtype=torch.int64),
            host(max_num_seqs, max_blocks_per_seq, dtype=torch.int32),
            host(max_num_seqs, dtype=torch.int32),
            host(max_num_seqs + 1, dtype=torch.int32),
        )
        self._dev = self._on_device(self._host)
        # numpy views share the host memory: element writes without tensor ops.
        self._slot, self._table, self._lens, self._qsl = (t.numpy() for t in self._host)
        # Cascade buffers: query order and restore [tokens], prefix table / lens / qsl
        # [entries], suffix table / lens / qsl [seqs]; entries = most groups + the rest.
        self.cascade = cascade
        self.max_prefix_entries = max_num_seqs // cascade.min_seqs + 1 if cascade else 0
        if self.max_prefix_entries > 1:
            e = self.max_prefix_entries
            self._cascade_host = (
                host(max_num_tokens, dtype=torch.int64),
                host(max_num_tokens, dtype=torch.int64),
                host(e, max_blocks_per_seq, dtype=torch.int32),
                host(e, dtype=torch.int32),
                host(e + 1, dtype=torch.int32),
                host(max_num_seqs, max_blocks_per_seq, dtype=torch.int32),
                host(max_num_seqs, dtype=torch.int32),
                host(max_num_seqs + 1, dtype=torch.int32),
            )
            self._cascade_dev = self._on_device(self._cascade_host)
            self._cascade_np = tuple(t.numpy() for t in self._cascade_host)
        max_len = max_blocks_per_seq * self.block_size
        self._positions = np.arange(max_len, dtype=np.int64)
        # The next plan must not overwrite host memory an in-flight copy reads.
        self._copied = torch.cuda.Event() if pin else None
        self._copy_pending = False

    def _on_device(self, host: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The device twins of host buffers (the host buffers themselves on the CPU)."""
        if self.device.type == "cpu":
            return host
        return tuple(torch.zeros_like(t, device=self.device) for t in host)

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

        self.wait_host_free()
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

        groups = []
        if self.max_prefix_entries > 1 and n_seqs >= self.cascade.min_seqs:
            full = np.fromiter(((r[3] - r[5]) // bs if r[5] else 0 for r in rows),
                               dtype=np.int64, count=n_seqs)
            groups = find_prefix_groups(table[:n_seqs], full, bs, self.cascade)
        cascade_rows = q + pad_tokens if groups else 0
        if groups:
            self._plan_cascade(groups, num_seqs, cascade_rows)
        return self.publish(n_tokens, num_seqs, real_tokens=t, real_seqs=n_seqs,
                            cascade_rows=cascade_rows, num_groups=len(groups),
                            shared_tokens=tuple(g[0] * bs for g in groups))

    def wait_host_free(self) -> None:
        """Wait until the last step's copies are done reading the host buffers (CUDA
        only; call before writing them)."""
        if self._copy_pending:
            self._copied.synchronize()
            self._copy_pending = False

    def host_views(self, num_tokens: int, num_seqs: int,
                   cascade_rows: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(device buffer, host buffer) pairs, each cut to a step of these sizes: the
        plain tensors, then the cascade ones when cascade_rows > 0 (its query rows)."""
        sizes = [num_tokens, num_seqs, num_seqs, num_seqs + 1]
        pairs = list(zip(self._dev, self._host))
        if cascade_rows:
            e = self.max_prefix_entries
            sizes += [cascade_rows, cascade_rows, e, e, e + 1, num_seqs, num_seqs, num_seqs + 1]
            pairs += zip(self._cascade_dev, self._cascade_host)
        return [(dev[:n], host[:n]) for (dev, host), n in zip(pairs, sizes)]

    def publish(self, num_tokens: int, num_seqs: int, *, real_tokens: int, real_seqs: int,
                cascade_rows: int = 0, num_groups: int = 0,
                shared_tokens: tuple[int, ...] = ()) -> AttentionMetadata:
        """Copy a step's host buffers to the device and return its metadata (views of
        the device buffers). ``plan`` ends here; a tensor-parallel worker, whose host
        buffers hold the step rank 0 planned (distributed/step_broadcast.py), starts
        here."""
        views = self.host_views(num_tokens, num_seqs, cascade_rows)
        if self._dev is not self._host:
            for dev, host in views:
                dev.copy_(host, non_blocking=True)
            if self._copied is not None:
                self._copied.record()
                self._copy_pending = True
        dev = [d for d, _ in views]
        cascade = None
        if cascade_rows:
            cascade = CascadeMetadata(*dev[4:], num_groups=num_groups,
                                      shared_tokens=shared_tokens)
        return AttentionMetadata(*dev[:4], real_tokens, real_seqs, cascade)

    def _plan_cascade(self, groups: list[tuple[int, list[int]]], num_seqs: int,
                      q_rows: int) -> None:
        """Fills the cascade host buffers from the plain ones (already filled for this
        step): sequence rows in cascade order (group members, then the rest), the query
        rows that follow them, each group's prefix entry and every row's suffix."""
        bs, width = self.block_size, self.max_blocks_per_seq
        order, restore, p_table, p_lens, p_qsl, s_table, s_lens, s_qsl = self._cascade_np
        members = [i for _, rows in groups for i in rows]
        in_group = np.zeros(num_seqs, dtype=bool)
        in_group[members] = True
        seq_order = np.concatenate([np.asarray(members, dtype=np.int64),
                                    np.flatnonzero(~in_group)])
        starts = self._qsl[:num_seqs].astype(np.int64)
        q_lens = (self._qsl[1:num_seqs + 1] - self._qsl[:num_seqs]).astype(np.int64)[seq_order]
        new_starts = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(q_lens, out=new_starts[1:])
        order[:q_rows] = (np.repeat(starts[seq_order] - new_starts[:-1], q_lens)
                          + np.arange(q_rows, dtype=np.int64))
        restore[order[:q_rows]] = np.arange(q_rows, dtype=np.int64)
        s_table[:num_seqs] = self._table[seq_order]
        s_lens[:num_seqs] = self._lens[seq_order]
        s_qsl[:num_seqs + 1] = new_starts
        r = 0
        for g, (shared, rows) in enumerate(groups):
            k = len(rows)
            s_table[r:r + k, :width - shared] = self._table[rows, shared:]
            s_lens[r:r + k] -= shared * bs
            p_table[g, :shared] = self._table[rows[0], :shared]
            p_lens[g] = shared * bs
            p_qsl[g] = new_starts[r]
            r += k
        # Entry G holds every other row (no shared keys: out 0, lse -inf), later ones none.
        p_lens[len(groups):] = 0
        p_qsl[len(groups)] = new_starts[r]
        p_qsl[len(groups) + 1:] = q_rows
