"""Prefix-aware, ref-counted, LRU-evicting KV-cache block manager (docs/design.md §5).

Host-side bookkeeping only: which physical cache blocks each sequence owns.
Nothing here touches a tensor.

Every block is in exactly one of two states:

* referenced: ``ref_count > 0``, listed in the tables of live sequences;
* free: ``ref_count == 0``, a key of ``_free``.

so ``num_free_blocks + |referenced blocks| == num_blocks`` by construction.

A free block may still be *cached*: it holds a committed full block whose
chained hash is a key of ``_cached``, and a later prompt with the same prefix
takes it back out of ``_free`` instead of recomputing it. ``_free`` is an
``OrderedDict`` used as a doubly linked list, front = next to be handed out:
blocks holding nothing reusable sit at the front, cached blocks behind them in
least-recently-freed order. A fresh block is always popped from the front, so a
cached block is evicted only when no empty block is left, least recently used
first. ``free`` releases a sequence's blocks tail first, so its tail is evicted
before its head (a prefix is worth more than the suffix that extends it).
Every operation is O(1) per block it touches; nothing scans all blocks.

Tiers (optional, ``tiers=``, tiers/protocol.py): an evicted cached block is first offered
to them (``evicted``), a newly cached one too (``committed``), and ``allocate`` walks
the prefix's chain through the device cache and the tiers alike: a block found only in
a tier gets a fresh device block and a queued restore, and counts as reused (its K/V
are copied back before the step reads them, so the sequence does not compute them).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

from .block_hash import BlockHasher, encode_extra_keys, root_hash
from ..tiers.protocol import BlockKey, BlockTiers

__all__ = [
    "BlockManager",
    "BlockTable",
    "BlockManagerStats",
    "NoFreeBlocksError",
    "SequenceIdError",
]


# The op of the NoFreeBlocksError of an append whose copy-on-write finds only blocks that
# pending copies still read (see BlockManager._copy_destination).
_ALL_FREE_ARE_COPY_SOURCES = (
    "append (every free block is still the source of a pending copy-on-write: "
    "run take_copies first)"
)


class NoFreeBlocksError(RuntimeError):
    """Not enough free blocks; the call that raised it changed nothing."""

    def __init__(self, needed: int, free: int, op: str = "allocate") -> None:
        self.needed = needed
        self.free = free
        self.op = op
        super().__init__(
            f"{op} needs {needed} free KV-cache blocks but only {free} are free; "
            "free or preempt a sequence, or give the cache more blocks"
        )

    def __reduce__(self):  # keep it picklable despite the custom __init__
        return (type(self), (self.needed, self.free, self.op))


class SequenceIdError(KeyError, ValueError):
    """An unknown sequence id, or an id that is already in use.

    Both a ``KeyError`` (a lookup failed) and a ``ValueError`` (a bad
    argument), so either ``except`` catches it.
    """

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


@dataclass
class BlockManagerStats:
    """Prefix-cache counters: tokens asked for, tokens reused, blocks evicted, blocks
    restored from a tier (their tokens count as reused too)."""

    queries: int = 0
    hits: int = 0
    evictions: int = 0
    restored: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class _Block:
    """One physical block. ``hash`` is set iff the block is in ``_cached``;
    then ``token_ids``/``parent_hash``/``extra`` hold the exact hash input so a
    hit is checked against real tokens, not trusted on the hash alone."""

    __slots__ = ("block_id", "ref_count", "hash", "token_ids", "parent_hash", "extra")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None
        self.token_ids: list[int] | None = None
        self.parent_hash: bytes | None = None
        self.extra: bytes | None = None


class BlockTable:
    """A live sequence's handle: its block table and how far its K/V are valid.

    Returned by ``BlockManager.table(seq_id)`` and kept up to date by the
    manager (the engine's ``Sequence.block_table`` is one): read ``block_ids``
    (physical blocks in token order), ``num_tokens`` and ``num_committed``
    (tokens ``[0, num_committed)`` hold valid K/V); never write them.
    ``hashes[i]`` is the chained hash of full block ``i`` (computed lazily,
    only when prefix caching is on); ``num_cached_blocks`` is how many leading
    blocks ``commit`` has already offered to the cache.
    """

    __slots__ = (
        "token_ids",
        "block_ids",
        "hashes",
        "num_committed",
        "num_cached_blocks",
        "extra",
    )

    def __init__(
        self,
        token_ids: list[int],
        block_ids: list[int],
        hashes: list[bytes],
        num_committed: int,
        num_cached_blocks: int,
        extra: bytes,
    ) -> None:
        self.token_ids = token_ids
        self.block_ids = block_ids
        self.hashes = hashes
        self.num_committed = num_committed
        self.num_cached_blocks = num_cached_blocks
        self.extra = extra

    @property
    def num_tokens(self) -> int:
        """Tokens the manager holds for the sequence (prompt plus appended)."""
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (f"BlockTable(blocks={self.block_ids}, tokens={self.num_tokens}, "
                f"committed={self.num_committed})")


def _as_token_list(token_ids: Iterable[int]) -> list[int]:
    tolist = getattr(token_ids, "tolist", None)  # tensors and arrays
    return list(tolist() if tolist is not None else token_ids)


class BlockManager:
    """Maps sequences to KV-cache blocks, sharing committed full blocks.

    See docs/design.md §5 for the contract. Beyond it: ``allocate`` also takes
    ``extra_keys`` (adapter ids, multimodal ids, ...: mixed into every block
    hash of the sequence, like ``cache_salt``), and the constructor takes
    ``hash_seed`` (reproducible hashes; default: ``PAGEDKV_HASH_SEED``, else
    random per process) and ``tiers`` (host/disk copies of evicted blocks, found by
    ``allocate`` after the device cache; tiers/protocol.py).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_prefix_caching: bool = True,
        hash_seed: str | bytes | int | None = None,
        tiers: BlockTiers | None = None,
    ) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = BlockManagerStats()
        self._hasher = BlockHasher(block_size)
        self._root = root_hash(hash_seed)
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}  # block hash -> block id
        self._seqs: dict[Hashable, BlockTable] = {}
        self._copies: dict[int, int] = {}  # pending copy-on-write, dst -> src
        self.tiers = tiers if enable_prefix_caching else None

    # ------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now, evictable cached blocks included."""
        return len(self._free)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def table(self, seq_id: Hashable) -> BlockTable:
        """The sequence's live handle (block ids, tokens, committed count)."""
        return self._seq(seq_id)

    def block_table(self, seq_id: Hashable) -> list[int]:
        """The sequence's physical block ids, in token order (a copy)."""
        return list(self._seq(seq_id).block_ids)

    def num_tokens(self, seq_id: Hashable) -> int:
        """How many tokens the sequence holds (prompt plus appended)."""
        return len(self._seq(seq_id).token_ids)

    def num_committed_tokens(self, seq_id: Hashable) -> int:
        """How many leading tokens have valid K/V (reused or committed)."""
        return self._seq(seq_id).num_committed

    # ------------------------------------------------------------ lifecycle
    def allocate(
        self,
        seq_id: Hashable,
        token_ids: Sequence[int],
        *,
        cache_salt: str | None = None,
        extra_keys: Iterable[object] = (),
    ) -> int:
        """Give a new sequence blocks for its prompt; return the reused tokens.

        Reuses the cached full blocks of the longest cached prefix, at most
        ``len(token_ids) - 1`` tokens (the last prompt token is always
        computed), so the result is a multiple of ``block_size``.
        """
        if seq_id in self._seqs:
            raise SequenceIdError(
                f"sequence {seq_id!r} is already allocated; free it first or use a new id"
            )
        tokens = _as_token_list(token_ids)
        if not tokens:
            raise ValueError(f"allocate({seq_id!r}) needs at least one prompt token")
        bs = self.block_size
        num_blocks = -(-len(tokens) // bs)

        hits: list[int | None] = []
        hashes: list[bytes] = []
        extra = b""
        if self.enable_prefix_caching:
            extra = encode_extra_keys(extra_keys, cache_salt=cache_salt)
            hits, hashes = self._lookup(tokens, extra)
        self._check_room(num_blocks, hits)
        if None in hits:  # some blocks come from a tier: load them, then check again
            hits = self._fetch(hits, tokens, hashes, extra)
            try:
                self._check_room(num_blocks, hits)
            except NoFreeBlocksError:
                self.tiers.release()
                raise

        for bid in hits:  # before taking fresh ones, so these are not evicted
            if bid is not None:
                blk = self._blocks[bid]
                if blk.ref_count == 0:
                    del self._free[bid]
                blk.ref_count += 1
        block_ids = [self._restore(self._key(i, tokens, hashes, extra)) if bid is None
                     else bid for i, bid in enumerate(hits)]
        block_ids += [self._take_fresh() for _ in range(num_blocks - len(hits))]

        reused = len(hits) * bs
        self._seqs[seq_id] = BlockTable(tokens, block_ids, hashes, reused, len(hits), extra)
        self.stats.queries += len(tokens)
        self.stats.hits += reused
        return reused

    def commit(self, seq_id: Hashable, num_computed_tokens: int) -> None:
        """Tokens ``[0, num_computed_tokens)`` now hold valid K/V in the cache.

        Their full blocks become reusable by other sequences. Monotonic: a
        count at or below the current one is a no-op, so repeating a commit
        is harmless.
        """
        seq = self._seq(seq_id)
        n = num_computed_tokens
        if not 0 <= n <= len(seq.token_ids):
            raise ValueError(
                f"commit({seq_id!r}, {n}): num_computed_tokens must be in "
                f"[0, {len(seq.token_ids)}] (the sequence's length)"
            )
        if n <= seq.num_committed:
            return
        full = n // self.block_size
        if self.enable_prefix_caching and full > seq.num_cached_blocks:
            self._extend_hashes(seq, full)  # may raise on bad tokens: do it first
            self._cache_blocks(seq, full)
        seq.num_committed = n

    def append(self, seq_id: Hashable, token_ids: Sequence[int]) -> None:
        """Extend a sequence by generated tokens.

        Takes a new block at each block boundary; if the partial last block is
        shared (after ``fork``), a fresh copy replaces it and ``(src, dst)`` is
        queued for ``take_copies()``.
        """
        seq = self._seq(seq_id)
        new = _as_token_list(token_ids)
        if not new:
            return
        bs = self.block_size
        old_len = len(seq.token_ids)
        num_new_blocks = -(-(old_len + len(new)) // bs) - len(seq.block_ids)
        last = seq.block_ids[-1]
        copy_last = old_len % bs != 0 and self._blocks[last].ref_count > 1
        needed = num_new_blocks + copy_last
        if needed > len(self._free):
            raise NoFreeBlocksError(needed, len(self._free), "append")
        dst = self._copy_destination() if copy_last else None
        if copy_last and dst is None:
            raise NoFreeBlocksError(needed, len(self._free), _ALL_FREE_ARE_COPY_SOURCES)

        if copy_last:
            dst = self._take_fresh(dst)
            self._blocks[last].ref_count -= 1  # still >= 1: it was shared
            seq.block_ids[-1] = dst
            # If ``last`` is itself waiting for its copy, copy from its source:
            # copy_blocks may run all pairs at once, so pairs must not chain.
            self._copies[dst] = self._copies.get(last, last)
        seq.token_ids += new
        seq.block_ids += [self._take_fresh() for _ in range(num_new_blocks)]

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Create ``child_id`` sharing all of the parent's blocks and tokens."""
        parent = self._seq(parent_id)
        if child_id in self._seqs:
            raise SequenceIdError(
                f"cannot fork into {child_id!r}: that sequence id is already in use"
            )
        for bid in parent.block_ids:
            self._blocks[bid].ref_count += 1
        self._seqs[child_id] = BlockTable(
            list(parent.token_ids),
            list(parent.block_ids),
            list(parent.hashes),
            parent.num_committed,
            parent.num_cached_blocks,
            parent.extra,
        )

    def free(self, seq_id: Hashable) -> None:
        """Drop a sequence; its unshared committed full blocks stay cached."""
        seq = self._seq(seq_id)
        del self._seqs[seq_id]
        for bid in reversed(seq.block_ids):  # tail first: evicted before head
            self._release(bid)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (as vLLM's ``reset_prefix_cache``): later prompts
        find no prefix and compute it again. Refused (False, nothing changed) while
        any sequence holds blocks, since its blocks' hashes are what it would share;
        True once the cache is empty. Tier copies (host, disk) are kept."""
        if self._seqs:
            return False
        for blk in self._blocks:
            blk.hash = blk.token_ids = blk.parent_hash = blk.extra = None
        self._cached.clear()
        return True

    def take_copies(self) -> list[tuple[int, int]]:
        """Pending copy-on-write ``(src, dst)`` pairs; the queue is emptied.

        Run them (``copy_blocks``) before the next step writes to the cache.
        """
        pairs = [(src, dst) for dst, src in self._copies.items()]
        self._copies.clear()
        return pairs

    # ------------------------------------------------------------ internals
    def _seq(self, seq_id: Hashable) -> BlockTable:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise SequenceIdError(
                f"unknown sequence {seq_id!r}: it was never allocated or was already freed"
            ) from None

    def _lookup(self, tokens: list[int], extra: bytes) -> tuple[list[int | None], list[bytes]]:
        """The longest cached prefix of a prompt, walking its hash chain through the
        device cache, then the tiers: per full block its device block, or None where
        only a tier holds it. Also returns the hashes computed (one past the prefix on a
        miss: commit needs it later)."""
        bs = self.block_size
        parent = self._root
        hits: list[int | None] = []
        hashes: list[bytes] = []
        for i in range((len(tokens) - 1) // bs):
            block_tokens = tokens[i * bs : (i + 1) * bs]
            h = self._hasher.hash_block(parent, block_tokens, extra)
            hashes.append(h)
            bid = self._cached.get(h)
            if bid is not None:
                blk = self._blocks[bid]
                if (
                    blk.token_ids != block_tokens
                    or blk.parent_hash != parent
                    or blk.extra != extra
                ):
                    break  # a hash collision: never share on the hash alone
            elif self.tiers is None or not self.tiers.contains(h):
                break
            hits.append(bid)
            parent = h
        return hits, hashes

    def _check_room(self, num_blocks: int, hits: list[int | None]) -> None:
        """Raise unless a prompt of num_blocks blocks whose prefix is ``hits`` fits:
        cached hits in the free list leave it like fresh blocks, tier hits take fresh
        ones."""
        on_device = [bid for bid in hits if bid is not None]
        revived = sum(1 for bid in on_device if self._blocks[bid].ref_count == 0)
        needed = num_blocks - len(on_device) + revived
        if needed > len(self._free):
            raise NoFreeBlocksError(needed, len(self._free), "allocate")

    def _key(self, i: int, tokens: list[int], hashes: list[bytes], extra: bytes) -> BlockKey:
        bs = self.block_size
        parent = hashes[i - 1] if i else self._root
        return BlockKey(hashes[i], parent, tuple(tokens[i * bs : (i + 1) * bs]), extra)

    def _fetch(self, hits: list[int | None], tokens: list[int], hashes: list[bytes],
               extra: bytes) -> list[int | None]:
        """Load the tier hits of ``hits``; the prefix ends before the first that fails
        (a corrupt or vanished entry is a miss)."""
        for i, bid in enumerate(hits):
            if bid is None and not self.tiers.fetch(self._key(i, tokens, hashes, extra)):
                return hits[:i]
        return hits

    def _restore(self, key: BlockKey) -> int:
        """A fresh block that a tier refills with ``key``'s K/V before the next step;
        cached at once (a committed full block), so others may share it."""
        bid = self._take_fresh()
        self.tiers.restore(key, bid)
        self._set_cached(self._blocks[bid], key.hash, list(key.token_ids), key.parent_hash,
                         key.extra)
        self.stats.restored += 1
        return bid

    @staticmethod
    def _block_key(blk: _Block) -> BlockKey:
        return BlockKey(blk.hash, blk.parent_hash, tuple(blk.token_ids), blk.extra)

    def _set_cached(self, blk: _Block, h: bytes, token_ids: list[int], parent: bytes,
                    extra: bytes) -> None:
        self._cached[h] = blk.block_id
        blk.hash, blk.token_ids, blk.parent_hash, blk.extra = h, token_ids, parent, extra

    def _copy_destination(self) -> int | None:
        """The first free block no pending copy reads, or None. A sequence freed since
        the last ``take_copies`` may have left the source of a pending copy in the free
        list; as a new block it is safe (the copies run before the step writes), but as
        another copy's destination it would make a chain, which ``copy_blocks`` refuses
        (and a parallel copy would race on)."""
        sources = set(self._copies.values())
        return next((b for b in self._free if b not in sources), None)

    def _take_fresh(self, bid: int | None = None) -> int:
        """Pop free block ``bid`` (default: the front one), evicting its cached content
        if any."""
        if bid is None:
            bid, _ = self._free.popitem(last=False)
        else:
            del self._free[bid]
        blk = self._blocks[bid]
        if blk.hash is not None:
            if self.tiers is not None:  # before its K/V are overwritten: copy them down
                self.tiers.evicted(self._block_key(blk), bid)
            del self._cached[blk.hash]
            blk.hash = blk.token_ids = blk.parent_hash = blk.extra = None
            self.stats.evictions += 1
        blk.ref_count = 1
        return bid

    def _release(self, bid: int) -> None:
        blk = self._blocks[bid]
        blk.ref_count -= 1
        if blk.ref_count:
            return
        self._copies.pop(bid, None)  # nobody will read this copy any more
        self._free[bid] = None  # back: most recently used
        if blk.hash is None:
            self._free.move_to_end(bid, last=False)  # nothing to keep: reuse first

    def _extend_hashes(self, seq: BlockTable, num_full_blocks: int) -> None:
        have = len(seq.hashes)
        if have < num_full_blocks:
            parent = seq.hashes[-1] if have else self._root
            seq.hashes += self._hasher.hash_blocks(
                seq.token_ids, parent, seq.extra, have, num_full_blocks - have
            )

    def _cache_blocks(self, seq: BlockTable, num_full_blocks: int) -> None:
        """Offer committed full blocks ``[num_cached_blocks, num_full_blocks)``."""
        bs = self.block_size
        for i in range(seq.num_cached_blocks, num_full_blocks):
            blk = self._blocks[seq.block_ids[i]]
            if blk.hash is not None:
                continue  # shared with a fork relative or a hit: already cached
            h = seq.hashes[i]
            if h in self._cached:
                # Another block got here first with the same content (two
                # sequences computed it concurrently). Keep the first mapping;
                # this one stays uncached and is reused as an empty block.
                continue
            self._set_cached(blk, h, seq.token_ids[i * bs : (i + 1) * bs],
                             seq.hashes[i - 1] if i else self._root, seq.extra)
            if self.tiers is not None:
                self.tiers.committed(self._block_key(blk), blk.block_id)
        seq.num_cached_blocks = num_full_blocks
