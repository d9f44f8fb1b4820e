"""Rank 0 sends each planned step to the other ranks: two broadcasts of tensors.

Rank 0 plans a step on its host (ModelRunner.execute: token ids, positions, sampled
rows, and the StepPlanner's slot mapping, block table, sequence lengths, query starts,
cascade tensors when the step has prefix groups), then, before running it, broadcasts

1. a fixed-size int64 header: the step's sizes (engine/model_runner.py PlannedStep)
   and how long the payload is, or STOP;
2. the payload: those host buffers, cut to the step's sizes and packed one after the
   other into one int64 tensor (int32 buffers packed two to a slot), then the step's
   block moves as (src, dst) pairs.

Every other rank receives both into its own runner's host buffers (the same sizes: it
was built with the same engine arguments) and replays the step (ModelRunner.replay).
No pickles in the hot path, and one payload buffer reused by every step (grown only
for a larger one); the broadcasts run over a gloo group on the host, so a CUDA step's
plan never waits for the device.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..engine.model_runner import ModelRunner, PlannedStep

HEADER_FIELDS = ("kind", "num_tokens", "num_rows", "num_seqs", "real_tokens", "real_seqs",
                 "graph_size", "cascade_rows", "num_groups", "num_copies", "num_swap_out",
                 "num_swap_in", "payload_len")
STEP, STOP = 1, 2
MOVES = ("copies", "swap_out", "swap_in")


def _slots(t: Tensor) -> int:
    """int64 slots a buffer takes in the payload."""
    return t.numel() if t.dtype == torch.int64 else -(-t.numel() // 2)


def _region(payload: Tensor, offset: int, t: Tensor) -> Tensor:
    """The payload's part for `t`, as a flat tensor of t's dtype and size."""
    part = payload[offset:offset + _slots(t)]
    return part if t.dtype == torch.int64 else part.view(t.dtype)[:t.numel()]


class _Channel:
    """What sender and receiver share: the group, the header, the payload buffer."""

    def __init__(self, runner: ModelRunner, group: Any) -> None:
        self.runner = runner
        self.group = group
        self.src = dist.get_global_rank(group, 0) if group is not None else 0
        self.header = torch.zeros(len(HEADER_FIELDS), dtype=torch.int64)
        self.payload = torch.zeros(1024, dtype=torch.int64)

    def _buffer(self, n: int) -> Tensor:
        if self.payload.numel() < n:
            self.payload = torch.zeros(max(n, 2 * self.payload.numel()), dtype=torch.int64)
        return self.payload[:n]

    def _broadcast(self, t: Tensor) -> None:
        dist.broadcast(t, src=self.src, group=self.group)


class StepSender(_Channel):
    """Rank 0's end: send(step) after planning (ModelRunner.send_step), stop() once."""

    def send(self, step: PlannedStep) -> None:
        views = self.runner.host_views(step)
        moves = [getattr(step, m) for m in MOVES]
        n = sum(_slots(v) for v in views) + 2 * sum(len(m) for m in moves)
        payload = self._buffer(n)
        offset = 0
        for v in views:
            _region(payload, offset, v).copy_(v.reshape(-1))
            offset += _slots(v)
        for pairs in moves:
            if pairs:
                payload[offset:offset + 2 * len(pairs)] = torch.tensor(pairs).reshape(-1)
                offset += 2 * len(pairs)
        h = dict(kind=STEP, num_tokens=step.num_tokens, num_rows=step.num_rows,
                 num_seqs=step.num_seqs, real_tokens=step.real_tokens,
                 real_seqs=step.real_seqs, graph_size=step.graph_size,
                 cascade_rows=step.cascade_rows, num_groups=step.num_groups,
                 num_copies=len(moves[0]), num_swap_out=len(moves[1]),
                 num_swap_in=len(moves[2]), payload_len=n)
        self.header.copy_(torch.tensor([h[f] for f in HEADER_FIELDS]))
        self._broadcast(self.header)
        self._broadcast(payload)

    def stop(self) -> None:
        """Tell every rank to leave its loop (StepReceiver.receive returns None)."""
        self.header.zero_()
        self.header[0] = STOP
        self._broadcast(self.header)


class StepReceiver(_Channel):
    """Another rank's end: receive() the next step into the runner's host buffers."""

    def receive(self) -> Optional[PlannedStep]:
        """The next step (its host buffers filled), or None when rank 0 stopped."""
        self._broadcast(self.header)
        h = dict(zip(HEADER_FIELDS, self.header.tolist()))
        if h["kind"] == STOP:
            return None
        step = PlannedStep(h["num_tokens"], h["num_rows"], h["num_seqs"], h["real_tokens"],
                           h["real_seqs"], h["graph_size"], h["cascade_rows"],
                           h["num_groups"])
        payload = self._buffer(h["payload_len"])
        self._broadcast(payload)
        self.runner.wait_host_free()
        offset = 0
        for v in self.runner.host_views(step):
            v.view(-1).copy_(_region(payload, offset, v))
            offset += _slots(v)
        for m in MOVES:
            k = h[f"num_{m}"]
            setattr(step, m, [tuple(p) for p in payload[offset:offset + 2 * k]
                              .view(-1, 2).tolist()])
            offset += 2 * k
        return step
