"""The model runner: one scheduled step in, one sampled token per sampler out.

First the step's block moves, in the order that keeps every block's content right:
evicted prefix blocks to the host tier and swap-outs (preempted sequences' blocks to
the swap space), both before anything reuses them, copy-on-write copies, then prefix
blocks restored from a tier and swap-ins (resumed sequences' blocks back).

Plan on the host, run on the device (FlashInfer's plan/run split): token ids,
positions and the rows to sample are written into preallocated host buffers, the
step's AttentionMetadata by the StepPlanner (from each sequence's block table) into
its own; each is copied to the device with non_blocking=True, then the model runs and
samples.
execute() never reads a device tensor back; the engine reads the sampled tokens
after it returns, the one synchronisation per step.

The model runs under torch.compile(fullgraph=True, dynamic=True). Dynamic shapes
specialise sizes 0 and 1, so every step is padded to at least 2 tokens, 2
sequences and 2 sampled rows (padding tokens have slot -1: no cache write), and
duck sizing (one symbol for equal sizes) is switched off while tracing: then one
graph serves every step, and steps never recompile.
"""
from __future__ import annotations

import importlib
import logging
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor

from ..cache.block_manager import BlockManager
from ..cache.kv_cache import KVCache
from ..cache.step_plan import CascadeRule, StepPlanner
from ..layers.metadata import AttentionMetadata
from .cuda_graphs import DecodeGraphs
from .sampling import sample
from .scheduler import SchedulerOutput
from .swap import SwapSpace
from ..tiers.tiered_cache import TieredCache

MIN_SIZE = 2  # dynamic shapes specialise 0 and 1: never hand the graph a size below this


def _step(model, input_ids: Tensor, positions: Tensor, sample_rows: Tensor, kv_caches,
          metadata: AttentionMetadata, kv_scales) -> Tensor:
    """The device work of one step: the model, then logits for the sampled rows only."""
    if kv_scales is None:
        hidden = model.forward(input_ids, positions, kv_caches, metadata)
    else:
        hidden = model.forward(input_ids, positions, kv_caches, metadata, kv_scales=kv_scales)
    return model.compute_logits(hidden.index_select(0, sample_rows))


class _DropNoCudaRuntime(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No CUDA runtime is found" not in record.getMessage()


def _import_cpp_extension_quietly() -> None:
    """Inductor's C++ backend imports torch.utils.cpp_extension, whose import logs "No
    CUDA runtime is found" on a machine with a CUDA toolkit but no GPU: true, and beside
    the point of a CPU run. Import it first with that one message filtered out."""
    name = "torch.utils.cpp_extension"
    if name in sys.modules or torch.cuda.is_available():
        return
    logger, quiet = logging.getLogger(name), _DropNoCudaRuntime()
    logger.addFilter(quiet)
    try:
        importlib.import_module(name)
    finally:
        logger.removeFilter(quiet)


class CompiledStep:
    """_step under torch.compile(fullgraph=True, dynamic=True), counting the graphs made.

    One per backend, shared by every runner: the model is an argument (its parameters
    are graph inputs), so engines over the same architecture reuse the same graph
    instead of compiling their own.
    """

    _by_backend: dict[str, "CompiledStep"] = {}

    def __init__(self, backend: str) -> None:
        if backend == "inductor":
            _import_cpp_extension_quietly()
        self.backend = backend
        self.num_graphs = 0
        self.fn = torch.compile(_step, fullgraph=True, dynamic=True, backend=self._compile)

    @classmethod
    def get(cls, backend: str) -> "CompiledStep":
        if backend not in cls._by_backend:
            cls._by_backend[backend] = cls(backend)
        return cls._by_backend[backend]

    def _compile(self, gm, example_inputs):
        from torch._dynamo.backends.registry import lookup_backend
        compiled = lookup_backend(self.backend)(gm, example_inputs)
        self.num_graphs += 1  # after: a trace dynamo restarts does not count
        return compiled

    def __call__(self, *args) -> tuple[Tensor, int]:
        """Returns the logits and how many graphs this call compiled."""
        before = self.num_graphs
        with fx_config.patch(use_duck_shape=False):  # equal sizes must not share a symbol
            out = self.fn(*args)
        return out, self.num_graphs - before


@dataclass
class PlannedStep:
    """One step's sizes and block moves as planned on the host: with the contents of
    the host buffers (ModelRunner.host_views), all that running it takes. A
    tensor-parallel rank 0 sends both to the other ranks, which replay the step.

    num_tokens, num_rows, num_seqs: padded sizes of the token, sampled-row and sequence
    buffers; real_tokens, real_seqs: before padding; graph_size: the decode graph's
    capture size, 0 for none; cascade_rows: query rows of the cascade tensors, 0 on a
    plain step; copies, swap_out, swap_in: (src, dst) block pairs moved first.
    """

    num_tokens: int
    num_rows: int
    num_seqs: int
    real_tokens: int
    real_seqs: int
    graph_size: int = 0
    cascade_rows: int = 0
    num_groups: int = 0
    copies: list[tuple[int, int]] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)


class ModelRunner:
    def __init__(self, model, kv_cache: KVCache, block_manager: Union[BlockManager, int], *,
                 max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 compile: bool = True, compile_backend: str = "inductor",
                 swap: Optional[SwapSpace] = None, cuda_graphs: bool = False,
                 cascade: Optional[CascadeRule] = None,
                 tiers: Optional[TieredCache] = None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.swap = swap
        self.tiers = tiers
        self.device = kv_cache.device
        # Decode steps padded to capture sizes (replayed graphs on CUDA); None: unpadded.
        self.graphs = DecodeGraphs(max_num_seqs, self.device) if cuda_graphs else None
        padded = self.graphs.max_size if self.graphs is not None else 0
        self.max_num_tokens = max(max_num_batched_tokens, MIN_SIZE, padded)
        self.max_num_rows = max(max_num_seqs, MIN_SIZE, padded)
        bs = getattr(block_manager, "block_size", block_manager)
        self.planner = StepPlanner(block_manager,
                                   max_num_seqs=max(max_num_seqs + 1, MIN_SIZE, padded + 1),
                                   max_num_tokens=self.max_num_tokens,
                                   max_blocks_per_seq=-(-max_model_len // bs), device=self.device,
                                   cascade=cascade)
        pin = self.device.type == "cuda"
        self._host = {name: torch.zeros(n, dtype=torch.int64, pin_memory=pin) for name, n in
                      (("ids", self.max_num_tokens), ("pos", self.max_num_tokens),
                       ("rows", self.max_num_rows))}
        self._np = {name: t.numpy() for name, t in self._host.items()}
        self._dev = ({k: torch.zeros_like(t, device=self.device) for k, t in self._host.items()}
                     if self.device.type != "cpu" else self._host)
        # The next step must not overwrite pinned host memory a copy still reads.
        self._copied = torch.cuda.Event() if self.device.type == "cuda" else None
        self._arange = np.arange(max_model_len + 1, dtype=np.int64)
        self.kv_caches = kv_cache.kv_caches
        self.kv_scales = kv_cache.kv_scales if kv_cache.is_fp8 else None
        self.compiled = CompiledStep.get(compile_backend) if compile else None
        self.num_compiled_graphs = 0  # graphs compiled while this runner ran
        self.last_metadata: Optional[AttentionMetadata] = None  # the last step's (trace, tests)
        # Called with each planned step before it runs (its host buffers hold it): rank 0
        # of a tensor-parallel engine sends it to the other ranks (distributed/).
        self.send_step: Optional[Callable[[PlannedStep], None]] = None

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> Optional[Tensor]:
        """Run one step without waiting for the device: returns the sampled tokens (int64,
        one per sampler, in scheduled order) as a device tensor, None if none sampled."""
        self.move_blocks(out.swap_out, out.copies, out.swap_in)
        self.wait_host_free()
        ids, pos, rows = self._np["ids"], self._np["pos"], self._np["rows"]
        steps = []
        samplers = []
        t = 0
        for sch in out.scheduled:
            c, n = sch.num_computed, sch.num_new
            ids[t:t + n] = sch.seq.token_ids[c:c + n]
            pos[t:t + n] = self._arange[c:c + n]
            t += n
            steps.append((sch.seq.block_table, c, n))
            for s in sch.samplers:
                rows[len(samplers)] = t - 1
                samplers.append((s.request.params, s.generator))
        # A decode-shaped step (one token per sequence) is padded to its capture size:
        # fixed shapes, so its graph replays; any other step is padded only to the
        # MIN_SIZE the dynamic-shape graph needs.
        graph_size = 0
        if self.graphs is not None and t == len(steps) <= self.graphs.max_size:
            graph_size = max(self.graphs.size_for(t), MIN_SIZE)
            if len(samplers) > graph_size:  # a prompt's last token seeding n samples
                graph_size = 0
        if graph_size:
            num_tokens = num_rows = graph_size
            num_seqs = graph_size + 1  # the spare row owns the padding tokens
        else:
            num_tokens = max(t, MIN_SIZE)
            num_rows = max(len(samplers), MIN_SIZE)
            num_seqs = max(len(steps) + (num_tokens > t), MIN_SIZE)
        ids[t:num_tokens] = 0
        pos[t:num_tokens] = 0
        rows[len(samplers):num_rows] = 0
        metadata = self.planner.plan(steps, num_tokens=num_tokens, num_seqs=num_seqs)
        cascade = metadata.cascade
        step = PlannedStep(num_tokens, num_rows, num_seqs, t, len(steps), graph_size,
                           cascade_rows=0 if cascade is None else cascade.query_order.shape[0],
                           num_groups=0 if cascade is None else cascade.num_groups,
                           copies=out.copies, swap_out=out.swap_out, swap_in=out.swap_in)
        if self.send_step is not None:
            self.send_step(step)
        logits = self.run(step, metadata)
        if not samplers:
            return None
        return sample(logits[:len(samplers)], samplers)

    def move_blocks(self, swap_out, copies, swap_in) -> None:
        """A step's block moves, in the order that keeps every block's content right."""
        if self.tiers is not None:  # evicted cached blocks down a tier, before any write
            self.tiers.save_evicted()
        if swap_out:  # before anything writes the blocks they leave
            self.swap.swap_out(swap_out)
        if copies:  # copy-on-write of forked partial blocks, before anything writes
            self.kv_cache.copy_blocks(copies)
        if self.tiers is not None:  # prefix blocks back from a tier, before any read
            self.tiers.load_restored()
        if swap_in:
            self.swap.swap_in(swap_in)

    def wait_host_free(self) -> None:
        """Wait until last step's input copies are done reading the host buffers."""
        if self._copied is not None:
            self._copied.synchronize()
        self.planner.wait_host_free()

    def host_views(self, step: PlannedStep) -> list[Tensor]:
        """The host buffers a step occupies (token ids, positions, sampled rows, then
        the planner's), each cut to the step's sizes."""
        mine = [self._host["ids"][:step.num_tokens], self._host["pos"][:step.num_tokens],
                self._host["rows"][:step.num_rows]]
        planned = self.planner.host_views(step.num_tokens, step.num_seqs, step.cascade_rows)
        return mine + [host for _, host in planned]

    @torch.inference_mode()
    def replay(self, step: PlannedStep) -> None:
        """Run a step another rank planned, whose host buffers were filled from its
        (distributed/step_broadcast.py): the block moves, then the model."""
        self.move_blocks(step.swap_out, step.copies, step.swap_in)
        metadata = self.planner.publish(step.num_tokens, step.num_seqs,
                                        real_tokens=step.real_tokens, real_seqs=step.real_seqs,
                                        cascade_rows=step.cascade_rows,
                                        num_groups=step.num_groups)
        self.run(step, metadata)

    def run(self, step: PlannedStep, metadata: AttentionMetadata) -> Tensor:
        """The device part of a planned step: inputs to the device, then the model (a
        decode graph's replay when the step was padded to one); returns the logits."""
        sizes = {"ids": step.num_tokens, "pos": step.num_tokens, "rows": step.num_rows}
        if self._dev is not self._host:
            for k, n in sizes.items():
                self._dev[k][:n].copy_(self._host[k][:n], non_blocking=True)
            if self._copied is not None:
                self._copied.record()
        self.last_metadata = metadata
        args = (self.model, self._dev["ids"][:step.num_tokens],
                self._dev["pos"][:step.num_tokens], self._dev["rows"][:step.num_rows],
                self.kv_caches, metadata, self.kv_scales)
        if step.graph_size:
            return self.graphs.run(step.graph_size, lambda: self._forward(args),
                                   cascade=metadata.cascade is not None)
        return self._forward(args)

    def _forward(self, args) -> Tensor:
        if self.compiled is None:
            return _step(*args)
        logits, new_graphs = self.compiled(*args)
        self.num_compiled_graphs += new_graphs
        return logits
