"""BlockManager as a state machine: random allocate/append/fork/commit/free.

Besides the bookkeeping invariants of issue 3, the machine simulates the KV
cache itself (``kv[block][offset]`` = the token whose K/V sits there): a commit
writes its tokens, a copy-on-write pair copies a block. Then "reused blocks
hold the right K/V" and "nobody overwrites K/V another sequence relies on"
are checked directly, not inferred from the manager's own records.
"""

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from torch_pagedkv.cache import BlockManager, NoFreeBlocksError

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
            self.kv[table[p // self.bs]][p % self.bs] = tokens[p]
        self.bm.commit(seq, n)  # ... then the engine commits it
        self.committed[seq] = max(self.committed[seq], n)

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
