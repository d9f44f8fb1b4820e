"""A request's life in the engine beyond generate(): admission is all or nothing, abort
cancels a request wherever it is, stream() hands out tokens as steps make them, and a
tokenizer turns text into prompts and tokens into text.

Specification: a rejected or failed call leaves nothing queued and no block held; an
aborted request frees its blocks (its committed full blocks stay in the prefix cache)
and never runs again; the streamed pieces of every sample concatenate to generate()'s
tokens and text.
"""
from __future__ import annotations

import random
from collections import defaultdict

import pytest
import torch

from dense_llama import greedy_reference
from torch_pagedkv.engine import LLM, SamplingParams
from torch_pagedkv.engine.request import SequenceStatus
from torch_pagedkv.models import LlamaConfig, TinyLlama

CFG = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_size=16, max_position=1024, seed=5)
BLOCK = 4


@pytest.fixture(scope="module")
def model() -> TinyLlama:
    return TinyLlama(CFG)


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(CFG.vocab_size) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def engine(model, **kw) -> LLM:
    args = dict(num_blocks=128, block_size=BLOCK, compile=False)
    args.update(kw)
    return LLM(model, **args)


def assert_idle(llm: LLM) -> None:
    """Nothing queued, no block referenced, no swap block held."""
    bm = llm.block_manager
    assert not llm.has_unfinished()
    assert bm.num_free_blocks == bm.num_blocks and not bm._seqs
    if llm.swap is not None:
        assert llm.swap.num_free_blocks == llm.swap.num_blocks


GREEDY = SamplingParams(max_tokens=6)


# ---------------------------------------------------------------- all-or-nothing admission
@pytest.mark.parametrize("bad, error", [
    ([CFG.vocab_size], ValueError),  # out of the vocab
    ([], ValueError),  # empty
    (list(range(200)) * 3, ValueError),  # no room under max_model_len
    ("text without a tokenizer", ValueError),
    ([1, 2, "x"], TypeError),
])
def test_a_rejected_generate_queues_nothing(model, bad, error):
    good = prompts(2)
    llm = engine(model, max_model_len=256)
    with pytest.raises(error):
        llm.generate([good[0], bad, good[1]], GREEDY, use_tqdm=False)
    assert_idle(llm)
    out = llm.generate([good[0]], GREEDY, use_tqdm=False)  # runs alone: nothing left over
    assert len(out) == 1 and llm.stats.num_prefill_tokens == len(good[0])
    assert out[0].token_ids == greedy_reference(model, good[0], 6)


def test_rejected_arguments_queue_nothing(model):
    llm = engine(model, max_num_seqs=4)
    p = prompts(3)
    with pytest.raises(ValueError, match="max_num_seqs"):  # would never be admitted
        llm.generate(p, [GREEDY, SamplingParams(n=5), GREEDY], use_tqdm=False)
    with pytest.raises(ValueError, match="3 prompts but 2 SamplingParams"):
        llm.generate(p, [GREEDY, GREEDY], use_tqdm=False)
    with pytest.raises(ValueError, match="cache_salts"):
        llm.generate(p, GREEDY, cache_salts=["a"], use_tqdm=False)
    with pytest.raises(TypeError, match="SamplingParams"):
        llm.add_request(p[0], {"max_tokens": 3})
    with pytest.raises(ValueError, match="vocab"):
        llm.add_request([-1])
    assert_idle(llm)


class FailingModel(torch.nn.Module):
    """The tiny Llama, raising on its n-th forward."""

    def __init__(self, model: TinyLlama, fail_at: int) -> None:
        super().__init__()
        self.inner, self.fail_at, self.calls = model, fail_at, 0
        for name in ("num_layers", "num_kv_heads", "head_size", "vocab_size", "dtype",
                     "max_position"):
            setattr(self, name, getattr(model, name))

    def forward(self, *args, **kw):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("boom")
        return self.inner.forward(*args, **kw)

    def compute_logits(self, hidden):
        return self.inner.compute_logits(hidden)


def test_a_generate_failing_midway_leaves_nothing_queued(model):
    llm = engine(FailingModel(model, fail_at=4), max_num_batched_tokens=16)
    with pytest.raises(RuntimeError, match="boom"):
        llm.generate(prompts(5), GREEDY, use_tqdm=False)
    assert llm.stats.num_aborted == 5
    assert_idle(llm)
    p = prompts(1, seed=9)
    assert llm.generate(p, GREEDY, use_tqdm=False)[0].token_ids == greedy_reference(model, p[0], 6)


# ---------------------------------------------------------------- abort
def run_to_end(llm: LLM) -> list:
    steps = []
    while llm.has_unfinished():
        steps.append(llm.step())
    return steps


def scheduled_requests(steps) -> set[int]:
    return {s.seq.request.request_id for st in steps for s in st.scheduled.scheduled}


def test_abort_a_waiting_and_a_running_request(model):
    p = prompts(4, seed=1, lo=12, hi=20)
    llm = engine(model, max_num_seqs=2)
    reqs = [llm.add_request(x, SamplingParams(max_tokens=8)) for x in p]
    llm.step()
    llm.step()
    running, waiting = reqs[0], reqs[3]
    assert running.sequences[0].status is SequenceStatus.RUNNING
    assert waiting.sequences[0].status is SequenceStatus.WAITING
    committed = running.sequences[0].num_computed_tokens
    llm.abort(running.request_id)
    llm.abort(waiting.request_id)
    assert llm.stats.num_aborted == 2
    later = run_to_end(llm)
    assert scheduled_requests(later) == {1, 2}
    assert_idle(llm)
    for r in (running, waiting):
        assert llm.output(r).outputs[0].finish_reason == "abort"
    for r in reqs[1:3]:
        assert llm.output(r).token_ids == greedy_reference(model, r.prompt_token_ids, 8)
    # the aborted request's committed full blocks stayed in the prefix cache
    again = llm.generate([p[0]], SamplingParams(max_tokens=8), use_tqdm=False)[0]
    assert again.metrics.num_cached_tokens == min(committed, len(p[0]) - 1) // BLOCK * BLOCK > 0
    assert again.token_ids == greedy_reference(model, p[0], 8)


def test_abort_a_forked_request_before_and_after_its_fork(model):
    p = prompts(2, seed=2, lo=10, hi=10)
    sp = SamplingParams(max_tokens=6, n=3, temperature=1.0, seed=4)
    llm = engine(model, max_num_batched_tokens=4)  # the prompt takes 3 steps
    a = llm.add_request(p[0], sp)
    llm.step()
    assert a.sequences[1].status is SequenceStatus.WAITING  # not forked yet
    llm.abort(a.request_id)
    b = llm.add_request(p[1], sp)
    for _ in range(5):
        llm.step()
    assert sum(s.status is SequenceStatus.RUNNING for s in b.sequences) == 3
    llm.abort(b)  # a Request stands for its id
    assert_idle(llm)
    assert all(s.finish_reason == "abort" for r in (a, b) for s in r.sequences)


def test_abort_of_an_unknown_or_finished_id_is_a_no_op(model):
    llm = engine(model)
    out = llm.generate(prompts(1), GREEDY, use_tqdm=False)[0]
    llm.abort(out.request_id)
    llm.abort(12345)
    assert llm.stats.num_aborted == 0 and out.outputs[0].finish_reason == "length"
    assert_idle(llm)


# ---------------------------------------------------------------- streaming
def collect(pieces) -> tuple[dict, dict, dict]:
    """(tokens, text, yields) per (request_id, sample index), from stream() outputs."""
    tokens, text, count = defaultdict(list), defaultdict(str), defaultdict(int)
    for out in pieces:
        for c in out.outputs:
            key = (out.request_id, c.index)
            tokens[key] += c.token_ids
            text[key] += c.text or ""
            count[key] += 1
    return tokens, text, count


def test_stream_pieces_concatenate_to_generate(model):
    p = prompts(6, seed=3)
    params = [SamplingParams(max_tokens=9, temperature=0.8 * (i % 2), seed=i, n=1 + (i % 3 == 0),
                             stop_token_ids=[7, 11]) for i in range(6)]
    want = engine(model).generate(p, params, use_tqdm=False)
    llm = engine(model, max_num_batched_tokens=16, num_blocks=24)
    pieces = list(llm.stream(p, params))
    tokens, _, count = collect(pieces)
    assert {k: v for k, v in tokens.items()} == {
        (o.request_id, c.index): c.token_ids for o in want for c in o.outputs}
    for key, n in count.items():  # one token per sample per step, as steps made them
        assert n == len(tokens[key])
    assert [o.finished for o in pieces if o.finished] and sum(o.finished for o in pieces) == 6
    assert_idle(llm)


def test_leaving_a_stream_early_aborts_what_is_left(model):
    llm = engine(model)
    for i, out in enumerate(llm.stream(prompts(3), SamplingParams(max_tokens=20))):
        if i == 4:
            break
    assert_idle(llm)
    assert llm.stats.num_aborted == 3


def test_a_request_aborted_while_streaming_stops_appearing(model):
    llm = engine(model)
    seen_after = []
    aborted = False
    for out in llm.stream(prompts(3, seed=4), SamplingParams(max_tokens=10)):
        if aborted:
            seen_after.append(out.request_id)
        if out.request_id == 1 and not aborted:
            llm.abort(1)
            aborted = True
    assert seen_after and 1 not in seen_after
    assert_idle(llm)


# ---------------------------------------------------------------- text in, text out
SENTENCES = ["the quick brown fox jumps over the lazy dog",
             "a paged key value cache serves many requests at once",
             "héllo wörld, 你好, paged attention reads blocks"]


@pytest.fixture(scope="module")
def tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=CFG.vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    assert tok.get_vocab_size() <= CFG.vocab_size
    return tok


def test_text_prompts_and_text_outputs(model, tokenizer):
    llm = engine(model, tokenizer=tokenizer)
    ids = tokenizer.encode(SENTENCES[0]).ids
    outs = llm.generate([SENTENCES[0], ids], SamplingParams(max_tokens=12), use_tqdm=False)
    assert outs[0].prompt_token_ids == ids and outs[0].prompt == SENTENCES[0]
    assert outs[0].token_ids == outs[1].token_ids == greedy_reference(model, ids, 12)
    assert outs[0].text == outs[1].text == tokenizer.decode(outs[0].token_ids)
    assert isinstance(outs[0].text, str) and outs[0].text
    assert engine(model).generate([ids], GREEDY, use_tqdm=False)[0].text is None


def test_streamed_text_concatenates_to_the_text(model, tokenizer):
    p = SENTENCES + [SENTENCES[2][:9]]
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=1)
    want = engine(model, tokenizer=tokenizer).generate(p, params, use_tqdm=False)
    assert any("\ufffd" in tokenizer.decode(o.token_ids[:k]) for o in want
               for k in range(1, 24))  # partial characters did occur on the way
    _, text, count = collect(engine(model, tokenizer=tokenizer).stream(p, params))
    assert [text[(o.request_id, 0)] for o in want] == [o.text for o in want]
    assert all(n > 1 for n in count.values())
