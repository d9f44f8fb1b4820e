"""TieredCache: the host and disk tiers behind the BlockManager (tiers/protocol.py).

    device cache --evicted--> host tier (LRU, bytes-bounded)       tiers/host.py
    device cache --committed-> disk tier (write-through, LRU files) tiers/disk.py
    allocate: device hit, else host hit, else disk hit -> restored into a fresh block

The BlockManager calls it while it plans (contains/fetch/restore/release/evicted/
committed), which only decides and queues; the copies run when the engine says, in the
order that keeps every block right:

1. save_evicted(), first in the step, before anything writes the cache: evicted blocks
   to their host slots (swap_blocks device -> host);
2. (the step's swap-outs and copy-on-write copies)
3. load_restored(), before the step reads: host slots (swap_blocks host -> device) and
   disk payloads into the restored blocks;
4. write_through(), after the step's commit: newly cached blocks to disk files.

The disk tier is written through (every committed full block, once) rather than fed by
the host tier's evictions, so what an engine computed survives it whenever it stops;
the host tier keeps what the device evicts, so a block comes back from memory when it
can. A restored block is the same bytes that were stored; an fp8 block also keeps the
scales it was stored under, and is a miss if the cache's scales changed since.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

from ..cache.block_hash import HASH_SEED_ENV
from ..cache.kv_cache import KVCache
from .disk import DEFAULT_DISK_BYTES, DiskTier
from .host import HostTier
from .identity import cache_identity
from .protocol import BlockKey



@dataclass
class TierStats:
    host_hit_tokens: int = 0  # prompt tokens restored from the host tier
    disk_hit_tokens: int = 0  # prompt tokens restored from the disk tier
    saved_blocks: int = 0  # evicted blocks copied to the host tier
    written_blocks: int = 0  # committed blocks written to the disk tier
    failed_fetches: int = 0  # entries found but not usable (corrupt, foreign, gone)
    io_time_s: float = 0.0  # wall time in tier copies, file reads and file writes


class TieredCache:
    def __init__(self, kv_cache: KVCache, model, *, host_cache_bytes: Optional[int] = None,
                 disk_cache_dir: Optional[str | os.PathLike] = None,
                 disk_cache_bytes: Optional[int] = None) -> None:
        if disk_cache_bytes is not None and disk_cache_dir is None:
            raise ValueError("disk_cache_bytes bounds the disk tier: give disk_cache_dir too")
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.host = HostTier(kv_cache, host_cache_bytes) if host_cache_bytes else None
        self.disk = None
        if disk_cache_dir is not None:
            budget = DEFAULT_DISK_BYTES if disk_cache_bytes is None else disk_cache_bytes
            self.disk = DiskTier(disk_cache_dir, budget, cache_identity(model, kv_cache),
                                 kv_cache.block_bytes)
        self.stats = TierStats()
        self._fetched: dict[bytes, tuple[str, object]] = {}  # hash -> (tier, slot/payload)
        self._saves: dict[int, int] = {}  # host slot -> evicted device block
        self._host_restores: list[tuple[int, int]] = []  # (host slot, device block)
        self._disk_restores: list[tuple[memoryview, int]] = []  # (payload, device block)
        self._writes: list[tuple[BlockKey, int]] = []  # (key, device block) to write

    @property
    def hash_seed(self) -> Optional[bytes]:
        """The chain hash's root seed shared by every engine on the disk directory; None
        (the BlockManager's default) without a disk tier or when PAGEDKV_HASH_SEED is set,
        which then names blocks in every engine that sets it alike."""
        if self.disk is None or os.environ.get(HASH_SEED_ENV):
            return None
        return self.disk.hash_seed

    # ------------------------------------------------------------ BlockTiers (planning)
    def contains(self, block_hash: bytes) -> bool:
        return ((self.host is not None and block_hash in self.host)
                or (self.disk is not None and self.disk.contains(block_hash)))

    def fetch(self, key: BlockKey) -> bool:
        if key.hash in self._fetched:
            return True
        scales = self._scales()
        slot = None if self.host is None else self.host.get(key, scales)
        if slot is not None:
            self._fetched[key.hash] = ("host", slot)
            return True
        with self._timed():
            payload = None if self.disk is None else self.disk.read(key, scales)
        if payload is not None:
            self._fetched[key.hash] = ("disk", payload)
            return True
        self.stats.failed_fetches += 1
        return False

    def restore(self, key: BlockKey, block_id: int) -> None:
        tier, where = self._fetched.pop(key.hash)
        if tier == "host":
            self._host_restores.append((where, block_id))
            self.stats.host_hit_tokens += self.block_size
        else:
            self._disk_restores.append((where, block_id))
            self.stats.disk_hit_tokens += self.block_size

    def release(self) -> None:
        for tier, where in self._fetched.values():
            if tier == "host":
                self.host.pinned.discard(where)
        self._fetched.clear()

    def evicted(self, key: BlockKey, block_id: int) -> None:
        if self.host is None:
            return  # a disk tier has it already: written through when it was committed
        slot = self.host.put(key, self._scales())
        if slot is not None:
            self._saves[slot] = block_id

    def committed(self, key: BlockKey, block_id: int) -> None:
        if self.disk is not None:
            self._writes.append((key, block_id))

    # ------------------------------------------------------------ the copies (engine)
    def save_evicted(self) -> None:
        """Copy evicted blocks to the host tier: first in a step, before any write."""
        self.write_through()  # normally done after the last step already
        if self._saves:
            with self._timed():
                self.host.space.swap_out([(b, s) for s, b in self._saves.items()])
            self.stats.saved_blocks += len(self._saves)
            self._saves.clear()

    def load_restored(self) -> None:
        """Copy restored blocks into the cache: after the step's other copies, before
        it reads."""
        with self._timed():
            if self._host_restores:
                self.host.space.swap_in(self._host_restores)
                self._host_restores.clear()
            if self._disk_restores:
                payloads = torch.stack([torch.frombuffer(p, dtype=torch.uint8)
                                        for p, _ in self._disk_restores])
                blocks = [b for _, b in self._disk_restores]
                self._disk_restores.clear()
                self._scatter(payloads, blocks)
        if self.host is not None:
            self.host.unpin()

    def write_through(self) -> None:
        """Write newly cached blocks to the disk tier: after the step that computed them."""
        if not self._writes:
            return
        writes, self._writes = self._writes, []
        with self._timed():
            payloads = self._gather([b for _, b in writes])
            scales = self._scales()
            for (key, _), payload in zip(writes, payloads):
                self.stats.written_blocks += self.disk.write(key, scales,
                                                             payload.numpy().tobytes())

    @contextmanager
    def _timed(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stats.io_time_s += time.perf_counter() - t0

    # ------------------------------------------------------------ block bytes
    def _layers(self) -> list[torch.Tensor]:
        """Per layer the key then the value cache, as bytes: [blocks, block bytes]."""
        kc = self.kv_cache
        return [t.view(torch.uint8).view(kc.num_blocks, -1)
                for pair in zip(kc.key_caches, kc.value_caches) for t in pair]

    def _gather(self, blocks: list[int]) -> torch.Tensor:
        """[n, block bytes] on the CPU: per block every layer's key then value bytes."""
        idx = torch.tensor(blocks, dtype=torch.int64, device=self.kv_cache.device)
        return torch.cat([t.index_select(0, idx) for t in self._layers()], dim=1).cpu()

    def _scatter(self, payloads: torch.Tensor, blocks: list[int]) -> None:
        dev = self.kv_cache.device
        idx = torch.tensor(blocks, dtype=torch.int64, device=dev)
        payloads = payloads.to(dev)
        width = payloads.shape[1] // (2 * self.kv_cache.num_layers)
        for i, t in enumerate(self._layers()):
            t.index_copy_(0, idx, payloads[:, i * width:(i + 1) * width])

    def _scales(self) -> tuple[float, ...]:
        kc = self.kv_cache
        if not kc.is_fp8:
            return ()
        return tuple(torch.cat([s for pair in kc.kv_scales for s in pair]).tolist())

    def __repr__(self) -> str:
        return f"TieredCache(host={self.host!r}, disk={self.disk!r})"
