"""The scheduler: which sequences run in the next step, and how many tokens each.

Continuous batching under a token budget (max_num_batched_tokens) and a sequence
cap (max_num_seqs), vLLM-v1 style: every step first serves the running sequences
in admission order (a decode takes 1 token, an unfinished prefill the next chunk),
then admits waiting ones into what is left. Prefill and decode tokens share one
forward pass. With chunked prefill a prompt may be split over steps; without it a
prompt is scheduled whole or not at all.

Blocks: admission allocates the whole prompt (BlockManager.allocate reuses the
cached prefix); a running sequence takes a block at each boundary when its
sampled token is appended (BlockManager.append, with copy-on-write of a forked
partial block). When append finds no free block, the most recently admitted
running sequence is preempted: its blocks are freed (their committed full blocks
stay in the prefix cache) and it goes back to the front of the waiting queue,
tokens kept. By recompute (the default) it is readmitted as one longer prompt and
its K/V computed again. By swap (a SwapSpace given), the blocks holding its
computed tokens are first copied to the swap space (`out.swap_out`); on
readmission `allocate` takes back what the prefix cache still holds and the rest
is copied into its fresh blocks (`out.swap_in`), its committed count restored.
When the swap space is full, that sequence falls back to recompute. A step that
preempts admits nobody, so no step both swaps out and swaps in: the runner copies
swap-outs before the step writes anything and swap-ins before it reads anything.

Prefix-aware admission: with prefix caching on, a waiting prompt whose leading
full blocks equal those of a running sequence that has not yet computed them
waits until they are committed, so it reuses them instead of computing them
alongside (the shared-system-prompt case of the demo).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..cache.block_manager import BlockManager, NoFreeBlocksError
from .request import Request, Sequence, SequenceStatus
from .swap import SwappedOut, SwapSpace


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: tokens [num_computed, num_computed + num_new)."""

    seq: Sequence
    num_computed: int
    num_new: int
    samplers: list[Sequence]  # draw a token from this chunk's last row (empty: chunk not last)
    is_decode: bool  # the one token sampled last step (else: prompt or recompute tokens)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    swapped: list[Sequence] = field(default_factory=list)  # of the preempted, those swapped
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (cache, swap) blocks
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (swap, cache) blocks

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.scheduled)

    @property
    def num_decode_tokens(self) -> int:
        return sum(s.num_new for s in self.scheduled if s.is_decode)

    @property
    def num_prefill_tokens(self) -> int:
        return self.num_tokens - self.num_decode_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_batched_tokens: int,
                 max_num_seqs: int, max_model_len: int, enable_chunked_prefill: bool = True,
                 swap: Optional[SwapSpace] = None) -> None:
        self.block_manager = block_manager
        self.swap = swap  # None: preemption by recompute
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, request: Request) -> None:
        """Drop every sequence of the request wherever it is; free its blocks (committed
        full blocks stay in the prefix cache) and its swap blocks."""
        for seq in request.sequences:
            if seq.status is SequenceStatus.FINISHED:
                continue
            if seq.status is SequenceStatus.RUNNING:
                self.running.remove(seq)
                self.block_manager.free(seq.seq_id)
            elif seq in self.waiting:  # a child not yet forked is in no queue
                self.waiting.remove(seq)
            if seq.swapped is not None:
                self.swap.free(seq.swapped.blocks)
                seq.swapped = None
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = "abort"

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------ one step
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if not self._append_pending(seq, out):
                break  # seq was the last running one and got preempted itself
            num_new = min(seq.num_uncomputed, budget)
            out.scheduled.append(self._chunk(seq, num_new))
            budget -= num_new
            i += 1
        if not out.preempted:  # blocks are short: admit nobody this step
            self._admit(out, budget)
        out.copies = self.block_manager.take_copies()
        return out

    def _append_pending(self, seq: Sequence, out: SchedulerOutput) -> bool:
        """Give the BlockManager seq's sampled tokens, preempting from the back if needed."""
        pending = seq.token_ids[seq.block_table.num_tokens:]
        while pending:
            try:
                self.block_manager.append(seq.seq_id, pending)
                break
            except NoFreeBlocksError:
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    return False
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        if self.swap is not None:
            self._swap_out(seq, out)
        self.block_manager.free(seq.seq_id)
        seq.block_table = None
        seq.request.metrics.num_preemptions += 1
        self.waiting.insert(0, seq)
        out.preempted.append(seq)

    def _swap_out(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Queue the copy of seq's computed blocks to the swap space, if they fit."""
        computed = seq.num_computed_tokens
        n = -(-computed // self.block_manager.block_size)
        blocks = self.swap.allocate(n) if n else None
        if blocks is None:
            return  # nothing computed, or no room: recompute this one
        out.swap_out += zip(seq.block_table.block_ids[:n], blocks)
        seq.swapped = SwappedOut(blocks, computed)
        seq.status = SequenceStatus.SWAPPED
        out.swapped.append(seq)

    def _swap_in(self, seq: Sequence, reused: int, out: SchedulerOutput) -> None:
        """Copy back the swapped blocks the prefix cache did not give seq (it reused
        `reused` tokens), and restore its committed count."""
        saved = seq.swapped
        first = reused // self.block_manager.block_size
        table = seq.block_table.block_ids
        out.swap_in += [(s, table[i]) for i, s in enumerate(saved.blocks) if i >= first]
        self.block_manager.commit(seq.seq_id, saved.num_tokens)  # no-op if reused covers it
        self.swap.free(saved.blocks)  # reused only after this step's copies (see docstring)
        seq.swapped = None

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        bm = self.block_manager
        j = 0
        while j < len(self.waiting) and budget > 0:
            seq = self.waiting[j]
            req = seq.request
            width = 1 if req.forked else req.params.n  # its forks will run too
            if self._num_slots() + width > self.max_num_seqs:
                break
            if not self.enable_chunked_prefill and self._uncomputed_on_admission(seq) > budget:
                break
            if bm.enable_prefix_caching and seq.swapped is None and self._prefix_in_flight(seq):
                j += 1
                continue
            try:
                reused = bm.allocate(seq.seq_id, seq.token_ids, cache_salt=req.cache_salt)
            except NoFreeBlocksError as e:
                if not self.running:
                    raise RuntimeError(
                        f"a sequence of {len(seq.token_ids)} tokens does not fit in the whole "
                        f"KV cache ({bm.num_blocks} blocks of {bm.block_size}): give the "
                        "engine more blocks or a larger memory budget") from e
                break
            del self.waiting[j]
            seq.block_table = bm.table(seq.seq_id)  # num_committed == reused
            if seq.swapped is not None:
                self._swap_in(seq, reused, out)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if not req.admitted:
                req.admitted = True
                req.metrics.num_cached_tokens = reused
            num_new = min(seq.num_uncomputed, budget)
            out.scheduled.append(self._chunk(seq, num_new))
            out.admitted.append(seq)
            budget -= num_new

    @staticmethod
    def _uncomputed_on_admission(seq: Sequence) -> int:
        """Tokens seq will compute once admitted (at most: the prefix cache may hold more)."""
        return len(seq.token_ids) - (seq.swapped.num_tokens if seq.swapped else 0)

    def _num_slots(self) -> int:
        """Running sequences, counting the forks an unforked parent will make."""
        return sum(1 if r.request.forked else r.request.params.n for r in self.running)

    def _prefix_in_flight(self, seq: Sequence) -> bool:
        """Does a running sequence share seq's leading full blocks but not have them
        computed yet? Then seq waits a step or two and reuses them."""
        bs = self.block_manager.block_size
        tokens = seq.token_ids
        if len(tokens) <= bs:
            return False
        head = tokens[:bs]
        for r in self.running:
            rt = r.token_ids
            if r.request.cache_salt != seq.request.cache_salt or rt[:bs] != head:
                continue
            limit = min(len(tokens) - 1, len(rt)) // bs * bs  # allocate reuses <= len - 1
            common = bs
            while common + bs <= limit and rt[common:common + bs] == tokens[common:common + bs]:
                common += bs
            if r.num_computed_tokens < common:
                return True
        return False

    def _chunk(self, seq: Sequence, num_new: int) -> ScheduledSeq:
        samplers: list[Sequence] = []
        if seq.num_computed_tokens + num_new == len(seq.token_ids):
            samplers = [seq]
            if not seq.request.forked:  # the prompt's last row also seeds the other samples
                samplers += seq.request.sequences[1:]
        c = seq.num_computed_tokens
        is_decode = num_new == 1 and c >= seq.num_prompt_tokens and c + 1 == len(seq.token_ids)
        return ScheduledSeq(seq, c, num_new, samplers, is_decode)

    # ------------------------------------------------------------ after the step
    def update(self, out: SchedulerOutput, tokens: list[int], now: float) -> list[Sequence]:
        """Record the step: commit computed K/V, fork, append sampled tokens, finish.
        `tokens` holds one token per sampler, in scheduled order. Returns finished seqs."""
        bm = self.block_manager
        finished: list[Sequence] = []
        k = 0
        for sch in out.scheduled:
            seq = sch.seq
            bm.commit(seq.seq_id, sch.num_computed + sch.num_new)  # seq.num_computed_tokens
            if not sch.samplers:
                continue
            req = seq.request
            if not req.forked:
                for child in sch.samplers[1:]:  # share every block of the prompt
                    bm.fork(seq.seq_id, child.seq_id)
                    child.token_ids = list(seq.token_ids)
                    child.block_table = bm.table(child.seq_id)
                    child.status = SequenceStatus.RUNNING
                    self.running.append(child)
                req.forked = True
            if req.metrics.time_to_first_token is None:
                req.metrics.time_to_first_token = now - req.arrival_time
            for s in sch.samplers:
                tok = tokens[k]
                k += 1
                s.token_ids.append(tok)
                reason = self._finish_reason(s, tok)
                if reason is not None:
                    s.finish_reason = reason
                    s.status = SequenceStatus.FINISHED
                    self.running.remove(s)
                    bm.free(s.seq_id)  # s.block_table stays, a record of its last state
                    finished.append(s)
        if k != len(tokens):
            raise RuntimeError(f"sampled {len(tokens)} tokens for {k} samplers")
        return finished

    def _finish_reason(self, seq: Sequence, token: int) -> Optional[str]:
        params = seq.request.params
        if token in params.stop_token_ids:
            return "stop"
        if len(seq.token_ids) - seq.num_prompt_tokens >= params.max_tokens:
            return "length"
        if len(seq.token_ids) >= self.max_model_len:
            return "length"
        return None
