"""The tier connector's worker side: the copies between vLLM's KV cache and the tiers.

Each worker (one per tensor-parallel rank) holds its rank's share: the host tier's
storage (per layer a tensor of `host slots` blocks shaped like one cache block) and its
own disk directory (tier_config.py: named by the rank's identity). vLLM hands every
layer's cache as a view whose dim 0 is the block ([num_blocks, ...] in the backend's
logical order: ours is [blocks, K/V, block_size, heads * head_size]), so one block of a
layer is `kv[b]` whatever the layout; a block's bytes on disk are every layer's `kv[b]`
in layer order, and the identity names the backend, so a file is only ever read back
into the layout it was written from.

Per step: `load` (before the forward) copies the step's hits into their device blocks;
a disk file that fails its check now (removed or rewritten since the scheduler read it)
is reported as a failed block, which vLLM recomputes. `save` (after the forward) copies
newly full blocks to host slots and writes them to disk, then orders the disk LRU.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from vllm.logger import init_logger

from torch_pagedkv.tiers.disk import DiskTier

from .tier_config import TierConfig, logged_tier_warnings
from .tier_scheduler import TierMeta

logger = init_logger("vllm.torch_pagedkv")


class TierWorker:
    def __init__(self, cfg: TierConfig, rank: int, vllm_config) -> None:
        self.cfg, self.rank = cfg, rank
        self.vllm_config = vllm_config
        self.layers: list[torch.Tensor] = []
        self.host: list[torch.Tensor] = []
        self.disk: Optional[DiskTier] = None
        self.failed: set[int] = set()
        self.stats = new_counts()

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.cfg.layer_names if n not in kv_caches]
        if missing:
            raise ValueError(f"PagedKVTierConnector: no KV cache registered for {missing}")
        self.layers = [kv_caches[n] for n in self.cfg.layer_names]
        block_bytes = sum(t[0].numel() * t.element_size() for t in self.layers)
        if block_bytes != self.cfg.block_bytes:
            raise ValueError(f"PagedKVTierConnector: a block takes {block_bytes} bytes in "
                             f"the registered caches, expected {self.cfg.block_bytes}")
        if self.cfg.host_slots:
            pin = self.layers[0].device.type == "cuda"  # DMA both ways
            self.host = [torch.empty((self.cfg.host_slots, *t.shape[1:]), dtype=t.dtype,
                                     pin_memory=pin) for t in self.layers]
        if self.cfg.disk_cache_dir is not None:
            with logged_tier_warnings():
                self.disk = DiskTier(self.cfg.disk_cache_dir, self.cfg.disk_cache_bytes,
                                     self.cfg.identities[self.rank], block_bytes)
        logger.info("PagedKVTierConnector rank %d: host tier %d blocks (%.1f MiB), disk "
                    "tier %s, %d layers, %d bytes per block", self.rank, self.cfg.host_slots,
                    self.cfg.host_slots * block_bytes / 2**20, self.disk, len(self.layers),
                    block_bytes)

    # ------------------------------------------------------------ the step
    def load(self, meta: TierMeta) -> None:
        if not meta.loads:
            return
        t0 = time.perf_counter()
        self.stats["host_loaded_blocks"] += self._host_copy(meta.loads, to_host=False)
        scales = self._scales()
        with logged_tier_warnings():
            for x in meta.loads:
                if x.slot is not None:
                    continue
                payload = None if self.disk is None else self.disk.read(x.key, scales)
                if payload is None:
                    self.failed.add(x.block_id)
                    self.stats["failed_loads"] += 1
                    continue
                self._scatter(x.block_id, torch.frombuffer(payload, dtype=torch.uint8))
                self.stats["disk_loaded_blocks"] += 1
        self.stats["io_s"] += time.perf_counter() - t0

    def save(self, meta: TierMeta) -> None:
        if not meta.saves and not meta.chains:
            return
        t0 = time.perf_counter()
        self.stats["host_saved_blocks"] += self._host_copy(meta.saves, to_host=True)
        to_disk = [x for x in meta.saves if x.disk]
        if self.disk is not None:
            payloads = self._gather([x.block_id for x in to_disk]) if to_disk else ()
            scales = self._scales()
            with logged_tier_warnings():
                for x, payload in zip(to_disk, payloads):
                    self.stats["disk_written_blocks"] += self.disk.write(
                        x.key, scales, payload.numpy().tobytes())
            for chain in meta.chains:  # after this step's reads and writes touched files
                self.disk.touch_chain(chain)
        self.stats["io_s"] += time.perf_counter() - t0

    def take_failed(self) -> set[int]:
        failed, self.failed = self.failed, set()
        return failed

    def take_stats(self) -> dict[str, float]:
        stats, self.stats = self.stats, new_counts()
        return stats

    # ------------------------------------------------------------ block bytes
    def _host_copy(self, moves, to_host: bool) -> int:
        """Copy the moves that have a host slot between their device block and the
        slot, every layer; returns how many."""
        pairs = [(x.block_id, x.slot) for x in moves if x.slot is not None]
        if pairs:
            blocks = self._index([b for b, _ in pairs])
            slots = torch.tensor([s for _, s in pairs], dtype=torch.long)
            for kv, store in zip(self.layers, self.host):
                if to_host:
                    store.index_copy_(0, slots, kv.index_select(0, blocks).cpu())
                else:
                    kv.index_copy_(0, blocks, store.index_select(0, slots).to(kv.device))
        return len(pairs)

    def _index(self, blocks: list[int]) -> torch.Tensor:
        return torch.tensor(blocks, dtype=torch.long, device=self.layers[0].device)

    def _gather(self, blocks: list[int]) -> torch.Tensor:
        """[n, block bytes] on the CPU: per block every layer's kv[b] bytes, in order."""
        idx = self._index(blocks)
        return torch.cat([kv.index_select(0, idx).view(torch.uint8).reshape(len(blocks), -1)
                          for kv in self.layers], dim=1).cpu()

    def _scatter(self, block_id: int, payload: torch.Tensor) -> None:
        offset = 0
        for kv in self.layers:
            block = kv[block_id]
            n = block.numel() * block.element_size()
            block.copy_(payload[offset:offset + n].view(kv.dtype).view(block.shape))
            offset += n

    def _scales(self) -> tuple[float, ...]:
        """An fp8 cache's per-layer (k, v) scales, stored with each block and checked
        when it is read back; () for other caches."""
        if not self.cfg.is_fp8:
            return ()
        ctx = self.vllm_config.compilation_config.static_forward_context
        return tuple(float(getattr(ctx[n], attr, 1.0)) for n in self.cfg.layer_names
                     for attr in ("_k_scale_float", "_v_scale_float"))


COUNTS = ("host_loaded_blocks", "disk_loaded_blocks", "host_saved_blocks",
          "disk_written_blocks", "failed_loads", "io_s")


def new_counts() -> dict[str, float]:
    return dict.fromkeys(COUNTS, 0)
