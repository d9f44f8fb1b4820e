"""The tier connector's scheduler side: what is in the tiers, what to load, what to store.

vLLM's scheduler asks, per waiting request, how many tokens past its device prefix-cache
hit the connector can supply (`matched_tokens`); we walk the request's chain of full
blocks from there and count blocks while the host index holds the exact block or every
rank's disk file is whole and exactly this block (read and checked here, so a corrupt,
truncated, foreign or half-written file is a miss with a warning before vLLM counts it);
the first miss ends the hit, so a suffix is never a hit without its prefix. At most the
prompt's tokens minus one are supplied (vLLM computes the last one).

Per step (`build_meta`) the workers get:
- loads: (device block, key, host slot or None = from disk) for the blocks just counted;
  the workers copy them in before the forward;
- saves: every block that became full in this step and is not stored yet, to a host slot
  (the index's LRU victim when full) and/or to disk; the workers copy them after the
  forward (write-through: a finished, preempted or evicted request's blocks are already
  stored, and a restart finds every block any earlier run computed);
- chains: the requests whose stored blocks changed, root first, for the disk LRU order.
Loads run before saves in a step, so a slot loaded from and given to a new block in the
same step is read before it is written.

Block names: SHA-256 chains (cache/block_hash.py) over the token ids and the request's
extra keys (cache_salt, LoRA adapter, multimodal inputs), rooted in the disk directory's
shared seed, so instances and restarts on one directory name blocks alike and a salted
request never meets another tenant's blocks.
"""
from __future__ import annotations

import os
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Optional

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from torch_pagedkv.cache.block_hash import BlockHasher, encode_extra_keys, root_hash
from torch_pagedkv.tiers.disk import DiskTier
from torch_pagedkv.tiers.host import HostIndex, SlotPool
from torch_pagedkv.tiers.protocol import BlockKey

from .tier_config import TierConfig, logged_tier_warnings

_VERIFIED_MAX = 1 << 16  # files checked this run, by (rank, hash) -> (inode, size)


@dataclass
class Load:
    block_id: int
    key: BlockKey
    slot: Optional[int]  # a host slot, None: the disk file


@dataclass
class Save:
    block_id: int
    key: BlockKey
    slot: Optional[int]  # a host slot to fill, None: not to the host tier
    disk: bool  # write the disk file


@dataclass
class TierMeta(KVConnectorMetadata):
    loads: list[Load] = field(default_factory=list)
    saves: list[Save] = field(default_factory=list)
    chains: list[list[bytes]] = field(default_factory=list)


class _Req:
    """A request's chain of full-block keys (extended as its tokens grow) and progress."""

    __slots__ = ("request", "extra", "keys", "saved", "plan", "sources")

    def __init__(self, request, extra: bytes) -> None:
        self.request = request
        self.extra = extra
        self.keys: list[BlockKey] = []
        self.saved = 0  # blocks 0..saved-1 are stored (or were found stored)
        self.plan: tuple[int, list[Optional[int]]] = (0, [])  # first block, slot per block
        self.sources: dict[CacheHitSource, int] = {}

    def chain(self, hasher: BlockHasher, root: bytes, n: int) -> list[BlockKey]:
        tokens, bs = self.request.all_token_ids, hasher.block_size
        while len(self.keys) < n:
            i = len(self.keys)
            parent = self.keys[-1].hash if self.keys else root
            ids = tuple(tokens[i * bs:(i + 1) * bs])
            self.keys.append(BlockKey(hasher.hash_block(parent, ids, self.extra), parent,
                                      ids, self.extra))
        return self.keys[:n]


def request_extra(request) -> Optional[bytes]:
    """The request's extra hash keys, or None when its KV is not a function of its token
    ids and these (prompt embeddings)."""
    if getattr(request, "prompt_embeds", None) is not None:
        return None
    keys: list[object] = []
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        keys.append(("lora", lora.lora_name, str(getattr(lora, "lora_path", ""))))
    for f in getattr(request, "mm_features", None) or ():
        pos = f.mm_position
        keys.append(("mm", str(f.identifier), int(pos.offset), int(pos.length)))
    return encode_extra_keys(keys, cache_salt=getattr(request, "cache_salt", None))


class TierScheduler:
    def __init__(self, cfg: TierConfig) -> None:
        self.cfg = cfg
        self.block_size = cfg.block_size
        self.hasher = BlockHasher(cfg.block_size)
        self.host = HostIndex(SlotPool(cfg.host_slots)) if cfg.host_slots else None
        self.disks: list[DiskTier] = []
        seed = None
        if cfg.disk_cache_dir is not None:
            with logged_tier_warnings():
                self.disks = [DiskTier(cfg.disk_cache_dir, cfg.disk_cache_bytes, ident,
                                       cfg.block_bytes) for ident in cfg.identities]
            seed = self.disks[0].hash_seed
        self.root = root_hash(seed)
        self.reqs: dict[str, _Req] = {}
        self.loads: list[Load] = []
        # the loads of the last steps built, block -> (request, block index): a load the
        # worker reports failed (a step or two later) is stored when vLLM recomputes it
        self._issued: deque[dict[int, tuple[str, int]]] = deque([{}], maxlen=4)
        self._verified: OrderedDict[tuple[int, bytes], tuple[int, int]] = OrderedDict()
        self.kv_cache_manager = None

    # ------------------------------------------------------------ vLLM's questions
    def matched_tokens(self, request, num_computed_tokens: int) -> int:
        r = self._req(request)
        bs = self.block_size
        if r is None or num_computed_tokens % bs:
            return 0
        start, limit = num_computed_tokens // bs, (request.num_tokens - 1) // bs
        slots: list[Optional[int]] = []
        keys = r.chain(self.hasher, self.root, limit)
        with logged_tier_warnings():
            for key in keys[start:]:
                slot = None if self.host is None else self.host.peek(key, ())
                if slot is None and not self._on_disk(key):
                    break
                slots.append(slot)
        r.plan = (start, slots)
        return len(slots) * bs

    def after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        r = self.reqs.get(request.request_id)
        if r is None or num_external_tokens <= 0:
            return
        start, slots = r.plan
        n = num_external_tokens // self.block_size
        ids = blocks.get_block_ids()[0]
        keys = r.keys
        for i, slot in zip(range(start, start + n), slots):
            self.loads.append(Load(ids[i], keys[i], slot))
            self._issued[-1][ids[i]] = (request.request_id, i)
        from_host = sum(s is not None for s in slots[:n]) * self.block_size
        r.sources = {s: t for s, t in ((CacheHitSource.HOST, from_host),
                                       (CacheHitSource.DISK, n * self.block_size - from_host))
                     if t}
        r.saved = max(r.saved, start + n)
        if self.host is not None:
            self.host.touch(k.hash for k in keys[:start + n])

    def hit_sources(self, request, num_external_tokens: int) -> dict[CacheHitSource, int]:
        r = self.reqs.get(request.request_id)
        return {} if r is None or not num_external_tokens else dict(r.sources)

    def load_failed(self, block_ids: set[int]) -> None:
        """Blocks the workers could not load (vLLM recomputes them): not stored after all."""
        for issued in self._issued:
            for b in block_ids & issued.keys():
                req_id, i = issued[b]
                r = self.reqs.get(req_id)
                if r is not None:
                    r.saved = min(r.saved, i)
                    for rank in range(len(self.disks)):
                        self._verified.pop((rank, r.keys[i].hash), None)

    def build_meta(self, scheduler_output) -> TierMeta:
        meta, self.loads = TierMeta(loads=self.loads), []
        # reading a file marks it used, root first: a request that loaded blocks this
        # step gets its chain re-marked (prefix last) after the reads
        reordered = {req_id for req_id, _ in self._issued[-1].values()}
        self._issued.append({})
        before = {r.req_id: r.num_computed_tokens for r in scheduler_output.scheduled_new_reqs}
        cached = scheduler_output.scheduled_cached_reqs
        before.update(zip(cached.req_ids, cached.num_computed_tokens))
        for req_id, n_scheduled in scheduler_output.num_scheduled_tokens.items():
            r = self.reqs.get(req_id)
            if r is None or req_id not in before:
                continue
            done = min(before[req_id] + n_scheduled, len(r.request.all_token_ids))
            n_full = done // self.block_size
            if n_full <= r.saved:
                if self.disks and req_id in reordered:
                    meta.chains.append([k.hash for k in r.keys[:r.saved]])
                continue
            keys = r.chain(self.hasher, self.root, n_full)
            ids = self.kv_cache_manager.get_block_ids(req_id)[0]
            for i in range(r.saved, n_full):
                slot = None if self.host is None else self.host.put(keys[i], ())
                disk = not all(d.contains(keys[i].hash) for d in self.disks)
                if slot is not None or disk:
                    meta.saves.append(Save(ids[i], keys[i], slot, disk))
            r.saved = n_full
            if self.host is not None:
                self.host.touch(k.hash for k in keys)
            if self.disks:
                meta.chains.append([k.hash for k in keys])
        return meta

    def finished(self, request) -> None:
        self.reqs.pop(request.request_id, None)

    # ------------------------------------------------------------ helpers
    def _req(self, request) -> Optional[_Req]:
        r = self.reqs.get(request.request_id)
        if r is None or r.request is not request:
            extra = request_extra(request)
            if extra is None:
                return None
            r = self.reqs[request.request_id] = _Req(request, extra)
        return r

    def _on_disk(self, key: BlockKey) -> bool:
        """Every rank's file of ``key`` is whole and exactly ``key``'s (checked once per
        file and inode this run: a file replaced or rewritten is checked again)."""
        if not self.disks:
            return False
        for rank, disk in enumerate(self.disks):
            try:
                st = os.stat(disk.path(key.hash))
            except OSError:
                return False
            memo = (rank, key.hash)
            if self._verified.get(memo) == (st.st_ino, st.st_size):
                self._verified.move_to_end(memo)
                continue
            if disk.read(key, None) is None:
                self._verified.pop(memo, None)
                return False
            self._verified[memo] = (st.st_ino, st.st_size)
            if len(self._verified) > _VERIFIED_MAX:
                self._verified.popitem(last=False)
        return True
