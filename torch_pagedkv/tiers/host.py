"""The host tier: KV blocks kept in host memory, a byte-bounded LRU of block copies.

HostIndex is the bookkeeping alone: which slot holds which block, named by the block's
salted chain hash and carrying its whole BlockKey (checked on a hit) and the fp8 scales
its bytes were stored under. Its slots come from a pool (`allocate(n)` / `free(slots)`),
so the storage can live elsewhere: in our engine it is a SwapSpace beside the cache
(HostTier below: LLM(host_cache_bytes=...)); in vLLM the index lives in the scheduler and
the storage in each worker (torch_pagedkv/vllm/connector.py).

A slot may be pinned: an entry fetched for a restore this step is never the LRU victim
of a save queued in the same step (the restore reads it after the saves have run).
`touch` marks a chain of blocks used with the prefix last, so the LRU victim is always
a suffix before its prefix: a prefix is never evicted while a suffix that needs it stays.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Optional

from ..cache.kv_cache import KVCache
from .protocol import BlockKey


@dataclass
class HostEntry:
    slot: int
    key: BlockKey
    scales: tuple[float, ...]  # the per-layer (k, v) scales of an fp8 cache, else ()


def host_slots(host_cache_bytes: int, block_bytes: int) -> int:
    """How many blocks of ``block_bytes`` (every layer's K and V) the budget holds (>= 1)."""
    num_slots = int(host_cache_bytes) // block_bytes
    if num_slots < 1:
        raise ValueError(
            f"host_cache_bytes={host_cache_bytes} holds no KV block: one block of all "
            f"layers' keys and values takes {block_bytes} bytes")
    return num_slots


class SlotPool:
    """Slot numbers 0..n-1 and a free list (the storage is someone else's)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pops slot 0 first

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> Optional[list[int]]:
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def free(self, slots: Iterable[int]) -> None:
        self._free.extend(slots)


class HostIndex:
    """An LRU index (front = least recently used) over a pool's slots."""

    def __init__(self, slots) -> None:
        self.slots = slots
        self.entries: OrderedDict[bytes, HostEntry] = OrderedDict()
        self.pinned: set[int] = set()

    @property
    def num_slots(self) -> int:
        return self.slots.num_blocks

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

    def peek(self, key: BlockKey, scales: tuple[float, ...]) -> Optional[int]:
        """The slot holding exactly ``key`` under ``scales``, with no side effect."""
        e = self.entries.get(key.hash)
        return e.slot if e is not None and e.key == key and e.scales == scales else None

    def put(self, key: BlockKey, scales: tuple[float, ...]) -> Optional[int]:
        """A slot for ``key`` (the caller copies its K/V there before anything reads
        it): a free one, else the least recently used unpinned entry's. An entry
        already held is only marked recently used (returns None: nothing to copy), as
        is a tier whose every slot is pinned."""
        if key.hash in self.entries:
            self.entries.move_to_end(key.hash)
            return None
        slots = self.slots.allocate(1)
        if slots is None:
            victim = next((h for h, e in self.entries.items() if e.slot not in self.pinned),
                          None)
            if victim is None:
                return None
            slots = [self.entries.pop(victim).slot]
        self.entries[key.hash] = HostEntry(slots[0], key, scales)
        return slots[0]

    def touch(self, hashes: Iterable[bytes]) -> None:
        """Mark a chain's blocks (given root first) used, the root most recently."""
        for h in reversed(list(hashes)):
            if h in self.entries:
                self.entries.move_to_end(h)

    def unpin(self) -> None:
        self.pinned.clear()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.entries)}/{self.num_slots} blocks)"


class HostTier(HostIndex):
    """The engine's host tier: the index over a SwapSpace mirroring its KV cache."""

    def __init__(self, kv_cache: KVCache, host_cache_bytes: int) -> None:
        from ..engine.swap import SwapSpace  # engine imports the tiers: not at module load
        self.space = SwapSpace(kv_cache, host_slots(host_cache_bytes, kv_cache.block_bytes))
        super().__init__(self.space)

    def __repr__(self) -> str:
        return f"HostTier({len(self.entries)}/{self.num_slots} blocks, {self.space!r})"
