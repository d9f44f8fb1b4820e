"""SwapSpace: CPU copies of preempted sequences' KV blocks (preemption_mode="swap").

When the scheduler preempts a running sequence it frees the sequence's cache blocks.
By recompute, their K/V are computed again on resumption (a prefill of the whole
context); by swap, the blocks that hold its computed tokens are first copied into this
space with `swap_blocks` and copied back into fresh cache blocks when it resumes, so
resuming costs two copies instead of a forward pass over the context.

The space mirrors the KV cache: per layer a key and a value tensor of the cache's block
shape and dtype, on the CPU (pinned when the cache is on CUDA, so the copies run as DMA),
and a free list of its blocks. It is host bookkeeping plus the copies; which sequence
goes where is the scheduler's decision (engine/scheduler.py), and the copies run at the
start of the step that needs them (ModelRunner.execute): swap-outs before anything
writes the freed cache blocks, swap-ins before anything reads the restored ones.

On CUDA a swap-in is asynchronous (DMA from pinned memory, ordered on the stream). A
swap-out is not: swap_blocks into a CPU tensor returns once its copies are done (the
host is a CPU tensor's reader). The runner issues it first in the step, when the stream
holds no work (the previous step ended reading back its tokens), so the host waits for
the copy itself and nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .. import ops
from ..cache.kv_cache import KVCache


@dataclass
class SwappedOut:
    """A swapped-out sequence's K/V: `blocks[i]` holds its cache block i, and together
    they hold its first `num_tokens` tokens (its committed count at preemption)."""

    blocks: list[int]
    num_tokens: int


class SwapSpace:
    """Per-layer CPU key/value blocks shaped like `kv_cache`'s, with a free list."""

    def __init__(self, kv_cache: KVCache, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a swap space needs at least one block, got {num_blocks}")
        self.kv_cache = kv_cache
        self.num_blocks = num_blocks
        pin = kv_cache.device.type == "cuda"
        shape = (num_blocks, kv_cache.block_size, kv_cache.num_kv_heads, kv_cache.head_size)
        # Never read before a swap-out writes it: empty, not zeroed.
        self.key_caches = [torch.empty(shape, dtype=kv_cache.dtype, pin_memory=pin)
                           for _ in range(kv_cache.num_layers)]
        self.value_caches = [torch.empty(shape, dtype=kv_cache.dtype, pin_memory=pin)
                             for _ in range(kv_cache.num_layers)]
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pops block 0 first

    @classmethod
    def for_budget(cls, kv_cache: KVCache, swap_space_bytes: int) -> "SwapSpace":
        """The largest space of `kv_cache`'s blocks that fits in swap_space_bytes."""
        num_blocks = int(swap_space_bytes) // kv_cache.block_bytes
        if num_blocks < 1:
            raise ValueError(
                f"swap_space_bytes={swap_space_bytes} holds no KV block: one block of all "
                f"layers' keys and values takes {kv_cache.block_bytes} bytes")
        return cls(kv_cache, num_blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.key_caches) + sum(t.nbytes for t in self.value_caches)

    def allocate(self, n: int) -> Optional[list[int]]:
        """n free swap blocks, or None (nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        taken = self._free[len(self._free) - n:]
        del self._free[len(self._free) - n:]
        return taken[::-1]

    def free(self, blocks: Sequence[int]) -> None:
        self._free.extend(reversed(blocks))

    def swap_out(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy cache block g into swap block s for each (g, s), in every layer."""
        self._copy(pairs, self.kv_cache.key_caches, self.key_caches,
                   self.kv_cache.value_caches, self.value_caches)

    def swap_in(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy swap block s into cache block g for each (s, g), in every layer."""
        self._copy(pairs, self.key_caches, self.kv_cache.key_caches,
                   self.value_caches, self.kv_cache.value_caches)

    @staticmethod
    def _copy(pairs, key_src, key_dst, value_src, value_dst) -> None:
        if not pairs:
            return
        # A host mapping: the CUDA op reads it on the host and issues DMA copies.
        mapping = torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)
        for src, dst in zip(key_src + value_src, key_dst + value_dst):
            ops.swap_blocks(src, dst, mapping)

    def __repr__(self) -> str:
        return (f"SwapSpace(blocks={self.num_blocks}, free={self.num_free_blocks}, "
                f"{self.nbytes / 2**20:.1f} MiB, pinned={self.key_caches[0].is_pinned()})")
