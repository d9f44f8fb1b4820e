"""HostTier: evicted prefix-cache blocks kept in host memory (LLM(host_cache_bytes=...)).

A byte-bounded LRU of block copies. The storage is a SwapSpace (engine/swap.py): per
layer a key and a value tensor of the cache's block shape and dtype, pinned when the
cache is on CUDA so the copies run as DMA, with swap_blocks doing the copies both ways.
Each entry is one slot, named by the block's salted chain hash and carrying its whole
BlockKey (checked on a hit) and the fp8 scales its bytes were stored under.

A slot may be pinned: an entry fetched for a restore this step is never the LRU victim
of a save queued in the same step (the restore reads it after the saves have run).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

from ..cache.kv_cache import KVCache
from ..cache.tiers import BlockKey
from .swap import SwapSpace


@dataclass
class HostEntry:
    slot: int
    key: BlockKey
    scales: tuple[float, ...]  # the per-layer (k, v) scales of an fp8 cache, else ()


class HostTier:
    """An LRU index (front = least recently used) over a SwapSpace's slots."""

    def __init__(self, kv_cache: KVCache, host_cache_bytes: int) -> None:
        num_slots = int(host_cache_bytes) // kv_cache.block_bytes
        if num_slots < 1:
            raise ValueError(
                f"host_cache_bytes={host_cache_bytes} holds no KV block: one block of all "
                f"layers' keys and values takes {kv_cache.block_bytes} bytes")
        self.space = SwapSpace(kv_cache, num_slots)
        self.entries: OrderedDict[bytes, HostEntry] = OrderedDict()
        self.pinned: set[int] = set()

    @property
    def num_slots(self) -> int:
        return self.space.num_blocks

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self.entries

    def get(self, key: BlockKey, scales: tuple[float, ...]) -> Optional[int]:
        """The slot holding exactly ``key`` stored under ``scales``, pinned; else None."""
        e = self.entries.get(key.hash)
        if e is None or e.key != key or e.scales != scales:
            return None
        self.entries.move_to_end(key.hash)
        self.pinned.add(e.slot)
        return e.slot

    def put(self, key: BlockKey, scales: tuple[float, ...]) -> Optional[int]:
        """A slot for ``key`` (the caller copies its K/V there before anything reads
        it): a free one, else the least recently used unpinned entry's. An entry
        already held is only marked recently used (returns None: nothing to copy), as
        is a tier whose every slot is pinned."""
        if key.hash in self.entries:
            self.entries.move_to_end(key.hash)
            return None
        slots = self.space.allocate(1)
        if slots is None:
            victim = next((h for h, e in self.entries.items() if e.slot not in self.pinned),
                          None)
            if victim is None:
                return None
            slots = [self.entries.pop(victim).slot]
        self.entries[key.hash] = HostEntry(slots[0], key, scales)
        return slots[0]

    def unpin(self) -> None:
        self.pinned.clear()

    def __repr__(self) -> str:
        return f"HostTier({len(self.entries)}/{self.num_slots} blocks, {self.space!r})"
