"""CUDA graphs for decode steps: pad to a capture size, capture once, replay.

A decode step (every scheduled sequence computes one token and samples one) is padded to
the next capture size, 1, 2, 4, 8, then multiples of 8 (vLLM's sizes), so a handful of
shapes covers every batch. Each size is captured once, lazily, the first time a step of
that size runs, into one memory pool shared by all sizes; later steps of that size
replay it. Replay is correct because every input of the step lives in a static buffer
that the runner and the StepPlanner fill in place (token ids, positions, sampled rows,
slot_mapping, block_table, seq_lens, query_start_loc: views that start at the same
address every step) and the caches are fixed tensors. Prefill and mixed steps never
come here: they run compiled, without a graph.

On a CPU model the same bucketing and padding run with no capture (the function simply
runs), so the path is tested where no GPU is.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, ...: up to the first size that holds max_num_seqs rows."""
    sizes = [1, 2, 4, 8]
    while sizes[-1] < max_num_seqs:
        sizes.append(sizes[-1] + 8)
    first_fit = next(i for i, s in enumerate(sizes) if s >= max_num_seqs)
    return sizes[:first_fit + 1]


class DecodeGraphs:
    """One captured graph per capture size; `run` captures on first use, then replays."""

    def __init__(self, max_num_seqs: int, device: torch.device) -> None:
        self.sizes = capture_sizes(max_num_seqs)
        self.device = device
        self.capture = device.type == "cuda"
        self._graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.num_captures = 0
        self.num_replays = 0

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def size_for(self, num_seqs: int) -> int:
        """The capture size a decode step of num_seqs sequences is padded to."""
        for s in self.sizes:
            if s >= num_seqs:
                return s
        raise ValueError(f"a decode step of {num_seqs} sequences exceeds the largest capture "
                         f"size {self.max_size}")

    def run(self, size: int, fn: Callable[[], Tensor], *, cascade: bool = False) -> Tensor:
        """fn's output for a step padded to `size`: from its graph's replay on CUDA (the
        graph is captured the first time), from fn itself on the CPU. A cascade step
        (metadata.cascade set) has graphs of its own: its kernels read the cascade tensors,
        which the planner fills only on cascade steps."""
        if not self.capture:
            return fn()
        entry = self._graphs.get((size, cascade))
        if entry is None:
            entry = self._capture(fn)
            self._graphs[(size, cascade)] = entry
        graph, out = entry
        graph.replay()
        self.num_replays += 1
        return out

    def _capture(self, fn: Callable[[], Tensor]) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        # Warm up on a side stream first (compilation, lazy init and allocator growth must
        # not happen inside the capture), as torch.cuda.graphs recommends. The warm-up
        # writes this step's own K/V to its own slots: the replay writes the same values.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = fn()
        self.num_captures += 1
        return graph, out
