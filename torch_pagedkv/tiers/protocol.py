"""What the BlockManager asks of the tiers below the device cache (docs/design.md §5).


A committed full block evicted from the device cache need not be lost: a tier (host
memory, disk) may keep a copy under the block's salted chain hash, and a later prompt
with that prefix gets it copied back into a fresh device block instead of computing it.
The BlockManager only sees this protocol; the tiers themselves hold tensors and files
(tiers/tiered_cache.py) and copy blocks when the engine tells them to, before the step
that writes or reads them runs.

A tier entry carries the block's whole identity (``BlockKey``: the hash and the exact
hash input), and a hit is checked against it, as a device hit is checked against the
stored tokens: never trusted on the hash alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class TierWarning(UserWarning):
    """A tier could not serve or store a block (a corrupt file, a read-only directory,
    a full disk...): treated as a miss, the block is computed."""


@dataclass(frozen=True)
class BlockKey:
    """A full block's identity: ``hash = SHA-256(parent_hash || tokens || extra)``."""

    hash: bytes
    parent_hash: bytes
    token_ids: tuple[int, ...]
    extra: bytes


class BlockTiers(Protocol):
    """The tiers behind a BlockManager, called while it plans (no copy runs here).

    ``contains`` is a cheap, side-effect-free probe; ``fetch`` loads and verifies an
    entry and holds it until ``restore`` (queue its copy into a device block) or
    ``release`` (the allocate that fetched it gave up). ``evicted`` is told a cached
    block's content is about to be overwritten (copy it out first); ``committed`` that a
    block became cached (a write-through tier stores it).
    """

    def contains(self, block_hash: bytes) -> bool: ...

    def fetch(self, key: BlockKey) -> bool: ...

    def restore(self, key: BlockKey, block_id: int) -> None: ...

    def release(self) -> None: ...

    def evicted(self, key: BlockKey, block_id: int) -> None: ...

    def committed(self, key: BlockKey, block_id: int) -> None: ...
