"""BlockManager: one test per rule of docs/design.md §5, plus the block hash."""

import pickle

import pytest

from torch_pagedkv.cache import BlockManager, NoFreeBlocksError, SequenceIdError
from torch_pagedkv.cache.block_hash import (
    BlockHasher,
    encode_extra_keys,
    hash_block,
    root_hash,
)

BS = 4


def toks(start: int, n: int) -> list[int]:
    """n distinct token ids starting at ``start``."""
    return list(range(start, start + n))


def referenced(bm: BlockManager, seq_ids) -> set[int]:
    return {b for s in seq_ids for b in bm.block_table(s)}


def assert_conserved(bm: BlockManager, seq_ids) -> None:
    """Every block is free, referenced, or held for a pending copy's source."""
    held = len(getattr(bm, "_held_for_copy", []))
    assert bm.num_free_blocks + len(referenced(bm, seq_ids)) + held == bm.num_blocks


def snapshot(bm: BlockManager, seq_ids):
    return (
        {s: bm.block_table(s) for s in seq_ids},
        {s: bm.num_tokens(s) for s in seq_ids},
        bm.num_free_blocks,
        (bm.stats.queries, bm.stats.hits, bm.stats.evictions),
        list(bm._free),
        dict(bm._cached),
        dict(bm._copies),
    )


# ---------------------------------------------------------------- package
def test_exported_from_package_root():
    import torch_pagedkv

    assert torch_pagedkv.BlockManager is BlockManager
    assert torch_pagedkv.NoFreeBlocksError is NoFreeBlocksError
    assert issubclass(NoFreeBlocksError, RuntimeError)


# ---------------------------------------------------------------- allocate
def test_allocate_gives_ceil_len_over_block_size_blocks():
    bm = BlockManager(10, BS)
    assert bm.allocate("a", toks(0, 9)) == 0
    assert len(bm.block_table("a")) == 3
    assert len(set(bm.block_table("a"))) == 3
    assert bm.num_free_blocks == 7
    assert (bm.stats.queries, bm.stats.hits) == (9, 0)


def test_allocate_reuses_longest_committed_prefix():
    bm = BlockManager(10, BS)
    bm.allocate("a", toks(0, 10))
    bm.commit("a", 10)
    prompt = toks(0, 8) + [99, 98, 97]  # shares 2 full blocks, then diverges
    assert bm.allocate("b", prompt) == 8
    assert bm.block_table("b")[:2] == bm.block_table("a")[:2]
    assert bm.block_table("b")[2] not in bm.block_table("a")
    assert (bm.stats.queries, bm.stats.hits) == (21, 8)
    assert_conserved(bm, ["a", "b"])


def test_reuse_at_most_len_minus_one_tokens():
    bm = BlockManager(10, BS)
    bm.allocate("a", toks(0, 12))
    bm.commit("a", 12)
    assert bm.allocate("same", toks(0, 12)) == 8  # last token always computed
    assert bm.allocate("longer", toks(0, 13)) == 12
    assert bm.allocate("one_block", toks(0, 4)) == 0


def test_blocks_become_reusable_only_after_commit():
    bm = BlockManager(10, BS)
    bm.allocate("a", toks(0, 12))
    assert bm.allocate("b", toks(0, 12)) == 0
    bm.commit("a", 6)  # block 0 full and computed; block 1 half
    assert bm.allocate("c", toks(0, 12)) == 4
    bm.commit("a", 12)
    assert bm.allocate("d", toks(0, 12)) == 8


def test_commit_is_idempotent_and_monotonic():
    bm = BlockManager(10, BS)
    bm.allocate("a", toks(0, 12))
    bm.commit("a", 8)
    before = snapshot(bm, ["a"])
    bm.commit("a", 8)
    bm.commit("a", 3)
    assert snapshot(bm, ["a"]) == before
    assert bm.num_committed_tokens("a") == 8


def test_cache_salt_isolates_tenants():
    bm = BlockManager(20, BS)
    bm.allocate("a", toks(0, 9), cache_salt="tenant-1")
    bm.commit("a", 9)
    assert bm.allocate("b", toks(0, 9), cache_salt="tenant-2") == 0
    assert bm.allocate("c", toks(0, 9)) == 0
    assert bm.allocate("d", toks(0, 9), cache_salt="tenant-1") == 8


def test_extra_keys_isolate_like_salt():
    bm = BlockManager(20, BS)
    bm.allocate("a", toks(0, 9), extra_keys=("lora-7",))
    bm.commit("a", 9)
    assert bm.allocate("b", toks(0, 9), extra_keys=("lora-8",)) == 0
    assert bm.allocate("c", toks(0, 9), cache_salt="lora-7") == 0
    assert bm.allocate("d", toks(0, 9), extra_keys=("lora-7",)) == 8


def test_hash_is_chained_so_a_block_is_shared_only_at_its_prefix():
    bm = BlockManager(20, BS)
    x, y = toks(0, 4), toks(100, 4)
    bm.allocate("a", x + y + [1])
    bm.commit("a", 9)
    assert bm.allocate("b", y + x + [1]) == 0  # same blocks, other order
    assert bm.allocate("c", toks(50, 4) + y + [1]) == 0  # y after another head


def test_hit_checks_tokens_not_just_the_hash():
    class Colliding(BlockHasher):
        def hash_block(self, parent_hash, block_token_ids, extra=b""):
            return b"\0" * 32

        def hash_blocks(self, token_ids, parent_hash, extra=b"", start_block=0, num_blocks=None):
            n = len(token_ids) // self.block_size - start_block
            return [b"\0" * 32] * (n if num_blocks is None else min(n, num_blocks))

    bm = BlockManager(10, BS)
    bm._hasher = Colliding(BS)
    bm.allocate("a", toks(0, 9))
    bm.commit("a", 9)
    assert bm.allocate("b", toks(100, 9)) == 0  # same hash, other tokens
    assert bm.block_table("b")[0] != bm.block_table("a")[0]


def test_token_ids_may_be_any_int_sequence():
    bm = BlockManager(10, BS)
    bm.allocate("a", tuple(range(9)))
    bm.commit("a", 9)
    assert bm.allocate("b", range(9)) == 8


# ---------------------------------------------------------------- append
def test_append_takes_a_new_block_exactly_at_each_boundary():
    bm = BlockManager(10, BS)
    bm.allocate("a", toks(0, 3))
    for n, blocks in [(4, 1), (5, 2), (8, 2), (9, 3)]:
        bm.append("a", [7] * (n - bm.num_tokens("a")))
        assert len(bm.block_table("a")) == blocks
    bm.append("a", toks(0, 8))  # several boundaries at once
    assert len(bm.block_table("a")) == 5
    assert bm.take_copies() == []


def test_appended_full_blocks_are_reusable_after_commit():
    bm = BlockManager(10, BS)
    bm.allocate("a", toks(0, 3))
    bm.append("a", toks(3, 6))
    bm.commit("a", 9)
    assert bm.allocate("b", toks(0, 9)) == 8


# ---------------------------------------------------------------- fork / CoW
def test_fork_shares_all_blocks_without_taking_any():
    bm = BlockManager(10, BS)
    bm.allocate("p", toks(0, 6))
    free = bm.num_free_blocks
    bm.fork("p", "c")
    assert bm.block_table("c") == bm.block_table("p")
    assert bm.num_tokens("c") == 6
    assert bm.num_free_blocks == free
    assert_conserved(bm, ["p", "c"])


def test_append_copies_a_shared_partial_last_block():
    bm = BlockManager(10, BS)
    bm.allocate("p", toks(0, 6))
    bm.fork("p", "c")
    shared = bm.block_table("p")
    bm.append("c", [42])
    child = bm.block_table("c")
    assert child[0] == shared[0] and child[1] != shared[1]
    assert bm.block_table("p") == shared
    assert bm.take_copies() == [(shared[1], child[1])]
    assert bm.take_copies() == []
    bm.append("p", [43])  # the parent's last block is its own again: no copy
    assert bm.block_table("p") == shared
    assert bm.take_copies() == []
    assert_conserved(bm, ["p", "c"])


def test_append_after_fork_on_a_full_last_block_needs_no_copy():
    bm = BlockManager(10, BS)
    bm.allocate("p", toks(0, 8))
    bm.fork("p", "c")
    bm.append("c", [1])
    assert bm.block_table("c")[:2] == bm.block_table("p")
    assert len(bm.block_table("c")) == 3
    assert bm.take_copies() == []


def test_copies_never_chain():
    # copy_blocks may run all pairs at once: a pair's src must not be
    # another pending pair's dst.
    bm = BlockManager(10, BS)
    bm.allocate("a", toks(0, 6))
    src = bm.block_table("a")[1]
    bm.fork("a", "b")
    bm.append("b", [1])  # src -> d1
    bm.fork("b", "c")
    bm.append("c", [2])  # d1 is shared and still pending: copy from src
    pairs = bm.take_copies()
    assert [s for s, _ in pairs] == [src, src]
    assert len({d for _, d in pairs}) == 2


def test_free_drops_pending_copy_into_a_released_block():
    bm = BlockManager(10, BS)
    bm.allocate("a", toks(0, 6))
    bm.fork("a", "b")
    bm.append("b", [1])
    bm.free("b")
    assert bm.take_copies() == []


def test_a_pending_copy_source_is_never_another_copy_destination():
    """The parent of a fork leaves while its child's copy-on-write from the parent's
    last block y is pending: y is free again (free + referenced == total), but another
    copy-on-write before take_copies must not take y as its destination: the pairs
    (y, d), (s, y) would chain, which copy_blocks refuses (and a parallel copy races
    on). A new block may take y: the copies run before the step writes."""
    bm = BlockManager(5, BS)
    bm.allocate("a", toks(0, 6))  # blocks x, y (y partial)
    y = bm.block_table("a")[1]
    bm.fork("a", "b")
    bm.append("b", [1])  # y -> d
    bm.free("a")  # y's last holder leaves with the copy still pending
    assert y in bm._free and next(iter(bm._free)) == y  # y would be reused first
    assert_conserved(bm, ["b"])
    bm.fork("b", "c")
    bm.append("c", [2])  # the last block d is shared: d's content (y) -> e, e != y
    pairs = bm.take_copies()
    assert [s for s, _ in pairs] == [y, y]
    assert y not in {d for _, d in pairs}
    assert_conserved(bm, ["b", "c"])


def test_a_copy_on_write_with_only_copy_sources_free_is_refused():
    bm = BlockManager(4, BS)
    bm.allocate("a", toks(0, 6))  # x, y
    y = bm.block_table("a")[1]
    bm.fork("a", "b")
    bm.append("b", [1])  # y -> d; 4 blocks: x, y, d taken, one free
    bm.allocate("z", toks(50, 2))  # takes the last one
    bm.free("a")  # y is now the only free block, and a pending copy's source
    bm.fork("b", "c")
    before = snapshot(bm, ["b", "c", "z"])
    with pytest.raises(NoFreeBlocksError, match="run take_copies first"):
        bm.append("c", [2])
    assert snapshot(bm, ["b", "c", "z"]) == before
    assert bm.take_copies() == [(y, bm.block_table("b")[1])]
    bm.append("c", [2])  # now y can be its destination
    assert bm.take_copies() == [(bm.block_table("b")[1], y)]


# ---------------------------------------------------------------- free / LRU
def test_free_returns_every_block():
    bm = BlockManager(10, BS)
    bm.allocate("a", toks(0, 9))
    bm.fork("a", "b")
    bm.append("b", [1, 2, 3, 4])
    bm.free("a")
    assert_conserved(bm, ["b"])
    bm.free("b")
    assert bm.num_free_blocks == 10


def test_freed_committed_blocks_stay_cached_and_count_as_free():
    bm = BlockManager(10, BS)
    bm.allocate("a", toks(0, 9))
    bm.commit("a", 9)
    bm.free("a")
    assert bm.num_free_blocks == 10
    assert bm.allocate("b", toks(0, 9)) == 8
    # the two reused blocks left the free list like fresh ones
    assert bm.num_free_blocks == 7
    assert bm.stats.evictions == 0
    assert_conserved(bm, ["b"])


def test_cached_blocks_are_evicted_only_when_no_empty_block_is_left():
    bm = BlockManager(6, BS)
    bm.allocate("a", toks(0, 9))
    bm.commit("a", 9)
    bm.free("a")
    bm.allocate("b", toks(100, 12))  # 3 blocks: exactly the empty ones
    assert bm.stats.evictions == 0
    bm.free("b")  # b never committed: its blocks hold nothing reusable
    bm.allocate("c", toks(200, 12))  # takes b's blocks, not a's cached ones
    assert bm.stats.evictions == 0
    bm.free("c")
    assert bm.allocate("a2", toks(0, 9)) == 8


def test_eviction_is_lru_and_a_freed_tail_goes_before_its_head():
    bm = BlockManager(4, BS)
    bm.allocate("a", toks(0, 16))
    bm.commit("a", 16)
    a_blocks = bm.block_table("a")
    bm.free("a")
    bm.allocate("x", [7])  # needs one fresh block: evicts a's tail
    assert bm.stats.evictions == 1
    assert bm.block_table("x") == [a_blocks[-1]]
    bm.free("x")
    assert bm.allocate("a2", toks(0, 16)) == 12  # the head blocks survived
    assert bm.block_table("a2")[:3] == a_blocks[:3]


def test_least_recently_freed_sequence_is_evicted_first():
    bm = BlockManager(4, BS)
    bm.allocate("a", toks(0, 5))
    bm.allocate("b", toks(100, 5))
    bm.commit("a", 5)
    bm.commit("b", 5)
    bm.free("a")  # a's full block is older
    bm.free("b")
    bm.allocate("x", toks(500, 9))  # 3 blocks: 2 empty, then evict 1 cached
    assert bm.stats.evictions == 1
    bm.free("x")
    assert bm.allocate("b2", toks(100, 5)) == 4
    assert bm.allocate("a2", toks(0, 5)) == 0


def test_a_hit_refreshes_recency():
    bm = BlockManager(4, BS)
    for s, base in [("a", 0), ("b", 100)]:
        bm.allocate(s, toks(base, 5))
        bm.commit(s, 5)
    bm.free("a")
    bm.free("b")
    assert bm.allocate("a2", toks(0, 5)) == 4  # a's block used again ...
    bm.free("a2")  # ... and freed after b's
    bm.allocate("x", toks(500, 9))  # evicts one cached block: b's now
    bm.free("x")
    assert bm.allocate("a3", toks(0, 5)) == 4


def test_concurrent_duplicate_blocks_keep_the_first_mapping():
    bm = BlockManager(10, BS)
    bm.allocate("a", toks(0, 9))
    bm.allocate("b", toks(0, 9))  # nothing committed yet: its own blocks
    bm.commit("a", 9)
    bm.commit("b", 9)
    assert bm.allocate("c", toks(0, 9)) == 8
    assert bm.block_table("c")[:2] == bm.block_table("a")[:2]
    bm.free("a")
    bm.free("b")
    bm.free("c")
    assert bm.num_free_blocks == 10
    assert len(bm._cached) == 2  # no mapping lost or duplicated
    assert bm.allocate("d", toks(0, 9)) == 8


# ---------------------------------------------------------------- running out
def test_failing_allocate_raises_with_numbers_and_changes_nothing():
    bm = BlockManager(4, BS)
    bm.allocate("a", toks(0, 9))
    bm.commit("a", 9)
    before = snapshot(bm, ["a"])
    with pytest.raises(NoFreeBlocksError) as err:
        bm.allocate("b", toks(100, 9))
    assert (err.value.needed, err.value.free) == (3, 1)
    assert "3" in str(err.value) and "1" in str(err.value)
    assert snapshot(bm, ["a"]) == before
    assert "b" not in bm


def test_failing_allocate_counts_cached_free_hits_as_needed():
    bm = BlockManager(4, BS)
    bm.allocate("a", toks(0, 9))
    bm.commit("a", 9)
    bm.free("a")
    bm.allocate("x", toks(100, 4))  # left: 1 empty block + a's 2 cached
    before = snapshot(bm, ["x"])
    with pytest.raises(NoFreeBlocksError) as err:
        bm.allocate("b", toks(0, 17))  # 2 hits + 3 fresh = 5 of 3 free
    assert (err.value.needed, err.value.free) == (5, 3)
    assert snapshot(bm, ["x"]) == before
    assert bm.allocate("b", toks(0, 9)) == 8  # 2 hits + 1 fresh fits


def test_failing_append_raises_and_changes_nothing():
    bm = BlockManager(3, BS)
    bm.allocate("a", toks(0, 6))
    bm.fork("a", "b")
    before = snapshot(bm, ["a", "b"])
    with pytest.raises(NoFreeBlocksError) as err:
        bm.append("b", toks(0, 7))  # copy of the shared block + 2 new
    assert (err.value.needed, err.value.free) == (3, 1)
    assert snapshot(bm, ["a", "b"]) == before
    bm.append("b", [1])  # the copy alone fits
    assert bm.num_free_blocks == 0


def test_no_free_blocks_error_pickles():
    err = pickle.loads(pickle.dumps(NoFreeBlocksError(5, 2)))
    assert (err.needed, err.free) == (5, 2)


# ---------------------------------------------------------------- no caching
def test_without_prefix_caching_nothing_is_shared():
    bm = BlockManager(10, BS, enable_prefix_caching=False)
    bm.allocate("a", toks(0, 9))
    bm.commit("a", 9)
    assert bm.allocate("b", toks(0, 9)) == 0
    assert not set(bm.block_table("a")) & set(bm.block_table("b"))
    bm.free("a")
    assert bm.allocate("c", toks(0, 9)) == 0
    assert (bm.stats.queries, bm.stats.hits, bm.stats.evictions) == (27, 0, 0)


# ---------------------------------------------------------------- bad calls
def test_bad_sequence_ids_raise_clear_errors():
    bm = BlockManager(10, BS)
    bm.allocate("a", toks(0, 5))
    with pytest.raises(SequenceIdError, match="already allocated"):
        bm.allocate("a", toks(0, 5))
    with pytest.raises(SequenceIdError, match="already in use"):
        bm.fork("a", "a")
    for call in (
        lambda: bm.append("nope", [1]),
        lambda: bm.free("nope"),
        lambda: bm.commit("nope", 1),
        lambda: bm.fork("nope", "x"),
        lambda: bm.block_table("nope"),
    ):
        with pytest.raises(KeyError, match="unknown sequence 'nope'"):
            call()
    assert issubclass(SequenceIdError, ValueError)
    bm.free("a")
    with pytest.raises(SequenceIdError):
        bm.free("a")


def test_commit_outside_the_sequence_raises():
    bm = BlockManager(10, BS)
    bm.allocate("a", toks(0, 5))
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        bm.commit("a", 6)
    with pytest.raises(ValueError):
        bm.commit("a", -1)


def test_empty_prompt_is_rejected():
    bm = BlockManager(10, BS)
    with pytest.raises(ValueError, match="at least one"):
        bm.allocate("a", [])
    assert bm.num_free_blocks == 10


def test_block_table_is_a_copy():
    bm = BlockManager(10, BS)
    bm.allocate("a", toks(0, 5))
    bm.block_table("a").append(9)
    assert len(bm.block_table("a")) == 2


# ---------------------------------------------------------------- hashing
def test_block_hash_depends_on_parent_tokens_and_keys():
    root = root_hash("seed")
    h = hash_block(root, [1, 2, 3, 4])
    assert len(h) == 32
    assert h == hash_block(root, [1, 2, 3, 4])
    assert h != hash_block(root_hash("other"), [1, 2, 3, 4])
    assert h != hash_block(root, [1, 2, 3, 5])
    assert h != hash_block(root, [1, 2, 3, 4], cache_salt="t")
    assert h != hash_block(root, [1, 2, 3, 4], ("t",))
    assert hash_block(root, [1, 2, 3, 4], ("t",)) != hash_block(root, [1, 2, 3, 4], cache_salt="t")


def test_extra_key_encoding_is_unambiguous():
    enc = encode_extra_keys
    assert enc() == b""
    assert enc(("ab",)) != enc(("a", "b"))
    assert enc((1,)) != enc(("1",)) != enc((b"1",))
    assert enc((True,)) != enc((1,))
    assert enc((("a", "b"),)) != enc(("a", "b"))
    with pytest.raises(TypeError, match="extra hash key"):
        enc((object(),))


def test_hash_blocks_is_the_chain_of_hash_block():
    hasher = BlockHasher(4)
    root = root_hash(0)
    tokens = toks(0, 14)
    chain = hasher.hash_blocks(tokens, root, b"x")
    expected, parent = [], root
    for i in range(3):
        parent = hasher.hash_block(parent, tokens[4 * i : 4 * i + 4], b"x")
        expected.append(parent)
    assert chain == expected
    assert hasher.hash_blocks(tokens, chain[0], b"x", start_block=1) == chain[1:]


def test_root_is_random_per_process_unless_seeded(monkeypatch):
    monkeypatch.delenv("PAGEDKV_HASH_SEED", raising=False)
    assert root_hash() == root_hash()  # one per process
    assert root_hash() != root_hash(0)
    monkeypatch.setenv("PAGEDKV_HASH_SEED", "0")
    assert root_hash() == root_hash(0) == root_hash("0")


def test_seeded_managers_agree_on_hashes():
    a = BlockManager(4, BS, hash_seed=1)
    b = BlockManager(4, BS, hash_seed=1)
    for bm in (a, b):
        bm.allocate("s", toks(0, 9))
        bm.commit("s", 9)
    assert a._seq("s").hashes == b._seq("s").hashes


def test_a_full_block_of_non_int64_tokens_is_rejected():
    bm = BlockManager(10, BS)
    with pytest.raises(ValueError, match="int64"):
        bm.allocate("a", [1, 2, 3, 2**63, 5])
    assert "a" not in bm and bm.num_free_blocks == 10


def test_reset_prefix_cache_forgets_every_cached_block_but_only_when_idle():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("a", toks(0, 9))
    bm.commit("a", 9)
    assert not bm.reset_prefix_cache()  # "a" holds blocks: refused, nothing dropped
    bm.free("a")
    bm.allocate("b", toks(0, 9))
    assert bm.num_committed_tokens("b") == 8
    bm.free("b")
    assert bm.reset_prefix_cache() and bm.num_free_blocks == 8
    bm.allocate("c", toks(0, 9))
    assert bm.num_committed_tokens("c") == 0  # computed again
    bm.commit("c", 9)
    bm.free("c")
    bm.allocate("d", toks(0, 9))  # and cached again after its commit
    assert bm.num_committed_tokens("d") == 8
