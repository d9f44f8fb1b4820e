"""BlockManager as a state machine: random allocate/append/fork/commit/free.

Besides the bookkeeping invariants of issue 3, the machine simulates the KV
cache itself (``kv[block][offset]`` = the token whose K/V sits there): a commit
writes its tokens, a copy-on-write pair copies a block. Then "reused blocks
hold the right K/V" and "nobody overwrites K/V another sequence relies on"
are checked directly, not inferred from the manager's own records.

The tiered machine at the end runs the same rules over a real KV cache with host and
disk tiers below the manager (evictions copied down, prefixes restored, restarts).
"""

import hashlib
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from torch_pagedkv.cache import BlockManager, NoFreeBlocksError
from torch_pagedkv.cache.kv_cache import KVCache
from torch_pagedkv.engine.tiered_cache import TieredCache

# Prompts start with a slice of one of a few shared prefixes, so cache hits,
# sharing and eviction all happen often.
BASES = [list(range(100, 120)), [7] * 20]

prompts = st.builds(
    lambda base, n, tail: (BASES[base][:n] + tail) or [0],
    st.integers(0, len(BASES) - 1),
    st.integers(0, 16),
    st.lists(st.integers(0, 3), max_size=4),
)


class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(
        num_blocks=st.integers(2, 48),
        block_size=st.sampled_from([1, 2, 3, 4]),
        caching=st.sampled_from([True, True, True, False]),
    )
    def setup(self, num_blocks, block_size, caching):
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.bs = block_size
        self.caching = caching
        self.tokens: dict[int, list[int]] = {}  # the model of each live sequence
        self.committed: dict[int, int] = {}
        self.family: dict[int, int] = {}  # fork relatives share a family
        self.kv: dict[int, list] = {b: [None] * block_size for b in range(num_blocks)}
        self.queries = self.hits = 0
        self.next_id = 0

    # ------------------------------------------------------------ helpers
    def pick(self, data) -> int | None:
        """A live sequence; with none alive, allocate one first (rather than a
        precondition, so no step is wasted). None only if that fails."""
        if not self.tokens:
            self.allocate(data, data.draw(prompts), None)
        return data.draw(st.sampled_from(sorted(self.tokens))) if self.tokens else None

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def snapshot(self):
        bm = self.bm
        return (
            {s: (bm.block_table(s), bm.num_tokens(s)) for s in self.tokens},
            [b.ref_count for b in bm._blocks],
            list(bm._free),
            dict(bm._cached),
            dict(bm._copies),
            (bm.stats.queries, bm.stats.hits, bm.stats.evictions),
        )

    def refused(self, err: NoFreeBlocksError, before, data) -> None:
        """A refused call changed nothing; then preempt, as the engine would."""
        assert err.free == self.bm.num_free_blocks
        if err.needed <= err.free:  # a copy-on-write with only pending copies' sources free
            sources = set(self.bm._copies.values())
            assert "take_copies" in str(err) and all(b in sources for b in self.bm._free)
        assert self.snapshot() == before
        if self.tokens:
            self.drop(data.draw(st.sampled_from(sorted(self.tokens))))

    def drop(self, seq: int) -> None:
        self.bm.free(seq)
        del self.tokens[seq], self.committed[seq], self.family[seq]

    def content(self, block: int) -> list:
        """What a block will hold once the queued copies have run."""
        return self.kv[self.bm._copies.get(block, block)]

    def run_copies(self) -> None:
        pairs = self.bm.take_copies()
        assert len({dst for _, dst in pairs}) == len(pairs)
        # copy_blocks refuses a block that is both a source and a destination (a chain):
        assert not {src for src, _ in pairs} & {dst for _, dst in pairs}
        copied = [list(self.kv[src]) for src, _ in pairs]  # all at once, like
        for (_, dst), content in zip(pairs, copied):  # a parallel copy_blocks
            self.kv[dst] = content

    def write_kv(self, block: int, offset: int, token: int) -> None:
        self.kv[block][offset] = token

    def after_allocate(self) -> None:
        """Runs between a successful allocate and the check of its reused blocks."""

    # ------------------------------------------------------------ rules
    @rule(data=st.data(), prompt=prompts, salt=st.sampled_from([None, None, "tenant"]))
    def allocate(self, data, prompt, salt):
        seq, before = self.new_id(), self.snapshot()
        try:
            reused = self.bm.allocate(seq, prompt, cache_salt=salt)
        except NoFreeBlocksError as err:
            self.refused(err, before, data)
            return
        assert reused % self.bs == 0 and 0 <= reused <= len(prompt) - 1
        if not self.caching:
            assert reused == 0
        self.after_allocate()
        table = self.bm.block_table(seq)
        for p in range(reused):  # reused blocks hold this prompt's K/V
            assert self.content(table[p // self.bs])[p % self.bs] == prompt[p]
        self.tokens[seq] = list(prompt)
        self.committed[seq] = reused
        self.family[seq] = seq
        self.queries += len(prompt)
        self.hits += reused

    @rule(data=st.data(), new=st.lists(st.integers(0, 3), min_size=1, max_size=6))
    def append(self, data, new):
        seq = self.pick(data)
        if seq is None:
            return
        before = self.snapshot()
        try:
            self.bm.append(seq, new)
        except NoFreeBlocksError as err:
            self.refused(err, before, data)
            return
        self.tokens[seq] += new  # its copy-on-write pair, if any, stays queued

    @rule(data=st.data())
    def fork(self, data):
        parent = self.pick(data)
        if parent is None:
            return
        child = self.new_id()
        self.bm.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])
        self.committed[child] = self.committed[parent]
        self.family[child] = self.family[parent]

    @rule(data=st.data())
    def commit(self, data):
        seq = self.pick(data)
        if seq is None:
            return
        length = len(self.tokens[seq])
        n = data.draw(st.one_of(st.just(length), st.integers(0, length)))
        self.run_copies()  # a step first runs the queued copies, ...
        table, tokens = self.bm.block_table(seq), self.tokens[seq]
        for p in range(self.committed[seq], n):  # ... then writes K/V ...
            self.write_kv(table[p // self.bs], p % self.bs, tokens[p])
        self.bm.commit(seq, n)  # ... then the engine commits it
        self.after_commit()
        self.committed[seq] = max(self.committed[seq], n)

    def after_commit(self) -> None:
        """Runs after a commit (the end of an engine step)."""

    @rule(data=st.data())
    def free(self, data):
        seq = self.pick(data)
        if seq is None:
            return
        self.drop(seq)

    # ------------------------------------------------------------ invariants
    def references(self) -> dict[int, list[tuple[int, int]]]:
        """block -> [(seq, index in its table)]"""
        refs: dict[int, list[tuple[int, int]]] = {}
        for seq in self.tokens:
            for i, b in enumerate(self.bm.block_table(seq)):
                refs.setdefault(b, []).append((seq, i))
        return refs

    @invariant()
    def free_plus_referenced_is_total(self):
        assert self.bm.num_free_blocks + len(self.references()) == self.bm.num_blocks

    @invariant()
    def tables_cover_exactly_the_tokens(self):
        for seq, tokens in self.tokens.items():
            table = self.bm.block_table(seq)
            assert self.bm.num_tokens(seq) == len(tokens)
            assert len(table) == -(-len(tokens) // self.bs)
            assert len(set(table)) == len(table)

    @invariant()
    def shared_blocks_hold_the_same_tokens(self):
        bs = self.bs
        for users in self.references().values():
            slices = {tuple(self.tokens[s][i * bs : (i + 1) * bs]) for s, i in users}
            assert len(slices) == 1
            assert len({i for _, i in users}) == 1  # and sit at the same position

    @invariant()
    def only_full_blocks_are_shared_between_unrelated_sequences(self):
        for users in self.references().values():
            if len({self.family[s] for s, _ in users}) > 1:
                assert self.caching
                for s, i in users:
                    assert len(self.tokens[s]) >= (i + 1) * self.bs

    @invariant()
    def ref_counts_match_references_and_free_means_unreferenced(self):
        refs = self.references()
        for block in self.bm._blocks:
            assert block.ref_count == len(refs.get(block.block_id, ()))
            assert block.ref_count >= 0
        assert not set(self.bm._free) & set(refs)

    @invariant()
    def committed_kv_is_never_overwritten(self):
        for seq, tokens in self.tokens.items():
            table = self.bm.block_table(seq)
            for p in range(self.committed[seq]):
                assert self.content(table[p // self.bs])[p % self.bs] == tokens[p]

    @invariant()
    def cached_blocks_hold_their_tokens(self):
        for h, b in self.bm._cached.items():
            block = self.bm._blocks[b]
            assert block.hash == h
            assert self.content(b) == block.token_ids

    @invariant()
    def stats_count_queries_and_hits(self):
        stats = self.bm.stats
        assert (stats.queries, stats.hits) == (self.queries, self.hits)
        assert self.caching or stats.hits == stats.evictions == 0


BlockManagerMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBlockManagerMachine = BlockManagerMachine.TestCase


# ---------------------------------------------------------------- with tiers below it
class TieredBlockManagerMachine(BlockManagerMachine):
    """The same machine over a real KV cache with a host tier and/or a disk tier below
    the manager: a block's K/V are now tensor contents (key = the token, value = 2 x
    token + 1, -1 = never written), and every step's moves really run (TieredCache:
    saves of evicted blocks, copy-on-write, restores; writes to disk after a commit).
    Evictions happen whenever allocate or append needs a block; restores whenever a
    prompt's prefix is found in a tier. Rules beyond the inherited ones: step (every live
    sequence computed and committed), evict (a throwaway prompt filling every free
    block), restart (only the disk survives), corrupt_a_file. Every reused block,
    restored ones included, must hold the prompt's K/V (the inherited allocate rule),
    and every tier entry the K/V of its key."""

    @initialize(
        num_blocks=st.integers(3, 16),  # few: cached blocks are evicted often
        block_size=st.sampled_from([1, 2, 3, 4]),
        host_slots=st.integers(0, 6),
        disk=st.booleans(),
    )
    def setup(self, num_blocks, block_size, host_slots, disk):
        if not host_slots and not disk:
            host_slots = 1
        self.host_slots, self.disk = host_slots, disk
        self.dir = tempfile.mkdtemp(prefix="pagedkv-tiers-")
        # A fixed root seed: the same file names every run, as hypothesis needs to replay.
        Path(self.dir, "hash_seed").write_text("ab" * 32)
        self.bs = block_size
        self.caching = True
        self.tokens, self.committed, self.family = {}, {}, {}
        self.next_id = 0
        self.restart_engine(num_blocks)

    def teardown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def restart_engine(self, num_blocks: int) -> None:
        """A fresh cache, tiers and manager: only the disk tier's files survive."""
        self.kv_cache = KVCache(1, 1, 8, self.bs, num_blocks=num_blocks, dtype=torch.float32)
        for t in (self.kv_cache.key_caches[0], self.kv_cache.value_caches[0]):
            t.fill_(-1)
        host = self.host_slots * self.kv_cache.block_bytes or None
        self.tiers = TieredCache(self.kv_cache, None, host_cache_bytes=host,
                                 disk_cache_dir=self.dir if self.disk else None)
        self.bm = BlockManager(num_blocks, self.bs, hash_seed=self.tiers.hash_seed,
                               tiers=self.tiers)
        self.queries = self.hits = 0

    # ------------------------------------------------------------ K/V as tensors
    def write_kv(self, block: int, offset: int, token: int) -> None:
        self.kv_cache.key_caches[0][block, offset] = token
        self.kv_cache.value_caches[0][block, offset] = 2 * token + 1

    def content(self, block: int) -> list:
        src = self.bm._copies.get(block, block)
        return [None if k < 0 else int(k) for k in self.kv_cache.key_caches[0][src, :, 0, 0]]

    def run_copies(self) -> None:
        """A step's moves, in ModelRunner.move_blocks's order."""
        pairs = self.bm.take_copies()
        assert not {src for src, _ in pairs} & {dst for _, dst in pairs}
        self.tiers.save_evicted()
        self.kv_cache.copy_blocks(pairs)
        self.tiers.load_restored()

    def after_allocate(self) -> None:
        self.run_copies()  # a step runs: the restores land before anyone reads them

    def after_commit(self) -> None:
        self.tiers.write_through()

    @rule()
    def step(self):
        """An engine step computing every live sequence to its end: all commit."""
        self.run_copies()
        for seq, tokens in self.tokens.items():
            table = self.bm.block_table(seq)
            for p in range(self.committed[seq], len(tokens)):
                self.write_kv(table[p // self.bs], p % self.bs, tokens[p])
            self.bm.commit(seq, len(tokens))
            self.committed[seq] = len(tokens)
        self.after_commit()

    @rule()
    def evict(self):
        """A throwaway prompt of new tokens filling every free block: each cached free
        block is evicted, down to the tiers."""
        n = self.bm.num_free_blocks
        if n:
            seq = self.new_id()
            assert self.bm.allocate(seq, [1000 + seq] * (n * self.bs)) == 0
            self.queries += n * self.bs
            self.bm.free(seq)
            assert not self.bm._cached or self.tokens

    @rule(data=st.data())
    def restart(self, data):
        if not self.disk:
            return
        for seq in sorted(self.tokens):
            self.drop(seq)
        self.restart_engine(self.bm.num_blocks)

    @rule(data=st.data())
    def corrupt_a_file(self, data):
        files = sorted(Path(self.dir).rglob("*.kv"))
        if files:
            f = data.draw(st.sampled_from(files))
            f.write_bytes(f.read_bytes()[:-1])  # truncated: a miss, never a wrong block

    # ------------------------------------------------------------ tier invariants
    @invariant()
    def values_follow_keys(self):
        k, v = self.kv_cache.key_caches[0], self.kv_cache.value_caches[0]
        assert torch.equal(v, 2 * k + 1)

    @invariant()
    def host_tier_holds_each_hash_once_and_leaks_no_slot(self):
        host = self.tiers.host
        if host is None:
            return
        slots = [e.slot for e in host.entries.values()]
        assert len(set(slots)) == len(slots)
        assert all(h == e.key.hash for h, e in host.entries.items())
        assert len(slots) + host.space.num_free_blocks == host.num_slots
        assert not host.pinned and not self.tiers._fetched

    @invariant()
    def host_entries_hold_their_tokens(self):
        host = self.tiers.host
        if host is None:
            return
        pending = self.tiers._saves  # slot -> device block, copied at the next step
        keys = host.space.key_caches[0]
        for e in host.entries.values():
            held = (self.kv_cache.key_caches[0][pending[e.slot]] if e.slot in pending
                    else keys[e.slot])
            assert [int(x) for x in held[:, 0, 0]] == list(e.key.token_ids)

    @invariant()
    def disk_files_hold_their_tokens(self):
        for f in Path(self.dir).rglob("*.kv"):
            data = f.read_bytes()
            if hashlib.sha256(data[:-32]).digest() != data[-32:]:
                continue  # corrupted by the rule above: a miss when looked up
            extra_len = struct.unpack_from("<I", data, 104)[0]
            n = struct.unpack_from("<I", data, 108 + extra_len)[0]
            tokens = struct.unpack_from(f"<{n}q", data, 112 + extra_len)
            payload = torch.frombuffer(bytearray(data[-32 - self.kv_cache.block_bytes:-32]),
                                       dtype=torch.float32).view(2, self.bs, 8)
            assert [int(x) for x in payload[0, :, 0]] == list(tokens)
            assert torch.equal(payload[1], 2 * payload[0] + 1)
            assert f.name == data[40:72].hex() + ".kv"


TieredBlockManagerMachine.TestCase.settings = settings(
    max_examples=80,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# A truncated file warns when it is looked up (the corrupt_a_file rule): expected here.
TestTieredBlockManagerMachine = pytest.mark.filterwarnings(
    "ignore::torch_pagedkv.cache.tiers.TierWarning")(TieredBlockManagerMachine.TestCase)
