"""The engine's acceptance tests: LLM.generate gives the dense model's greedy tokens
whatever the engine does underneath (prefix caching, chunked prefill, preemption,
forks, compilation), and leaves no block referenced.

Engines run eagerly here except in the compile test; the tiny model makes a step cost
milliseconds.
"""
from __future__ import annotations

import random

import pytest
import torch

from dense_llama import greedy_reference
from torch_pagedkv.engine import LLM, SamplingParams
from torch_pagedkv.engine.model_source import is_hf_model
from torch_pagedkv.engine.request import SequenceStatus
from torch_pagedkv.models import LlamaConfig, TinyLlama

CFG = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_size=16, max_position=1024, seed=3)
BLOCK = 8
MAX_TOKENS = 12


def make_prompts(n: int, seed: int, families: int = 3, prefix: int = 37) -> list[list[int]]:
    """Prompts in families sharing a prefix (4 full blocks and a partial one), then
    1-40 tokens of their own; one prompt is exactly 5 blocks long."""
    rng = random.Random(seed)
    heads = [[rng.randrange(CFG.vocab_size) for _ in range(prefix)] for _ in range(families)]
    prompts = [heads[i % families] + [rng.randrange(CFG.vocab_size)
                                      for _ in range(rng.randint(1, 40))] for i in range(n)]
    prompts[1] = prompts[1][:5 * BLOCK] if len(prompts[1]) >= 5 * BLOCK else prompts[1]
    return prompts


PROMPTS = make_prompts(10, seed=0)


@pytest.fixture(scope="module")
def model() -> TinyLlama:
    return TinyLlama(CFG)


@pytest.fixture(scope="module")
def reference(model) -> list[list[int]]:
    return [greedy_reference(model, p, MAX_TOKENS) for p in PROMPTS]


def engine(model, **kw) -> LLM:
    args = dict(num_blocks=256, block_size=BLOCK, compile=False)
    args.update(kw)
    return LLM(model, **args)


def run(llm: LLM, prompts, params) -> tuple[list[list[int]], list]:
    """generate() by hand, keeping every StepOutput."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    reqs = [llm.add_request(p, sp) for p, sp in zip(prompts, params)]
    steps = []
    while llm.has_unfinished():
        steps.append(llm.step())
    return [r.sequences[0].output_token_ids for r in reqs], steps


GREEDY = SamplingParams(max_tokens=MAX_TOKENS)


def test_greedy_generate_equals_the_dense_model(model, reference):
    outs = engine(model).generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == reference
    assert all(o.outputs[0].finish_reason == "length" for o in outs)


def test_prefix_caching_on_and_off_give_identical_tokens(model, reference):
    on, off = engine(model, enable_prefix_caching=True), engine(model, enable_prefix_caching=False)
    outs_on = on.generate(PROMPTS, GREEDY, use_tqdm=False)
    outs_off = off.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs_on] == [o.token_ids for o in outs_off] == reference
    # ... and the cache was really used: 7 of 10 prompts reuse their family's 4 blocks.
    cached = [o.metrics.num_cached_tokens for o in outs_on]
    assert sorted(cached) == [0, 0, 0] + [4 * BLOCK] * 7
    assert on.stats.prefix_hits == 7 * 4 * BLOCK and off.stats.prefix_hits == 0
    assert on.stats.num_prefill_tokens == off.stats.num_prefill_tokens - 7 * 4 * BLOCK


def test_reset_prefix_cache_makes_the_next_run_compute_everything(model, reference):
    llm = engine(model)
    first = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert llm.generate(PROMPTS, GREEDY, use_tqdm=False)[0].metrics.num_cached_tokens > 0
    assert llm.reset_prefix_cache()
    again = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in again] == [o.token_ids for o in first] == reference
    assert again[0].metrics.num_cached_tokens == 0
    llm.add_request(PROMPTS[0], GREEDY)
    assert not llm.reset_prefix_cache()  # a request is unfinished: refused


def test_chunked_prefill_on_and_off_give_identical_tokens(model, reference):
    chunked = engine(model, max_num_batched_tokens=16)
    tokens, steps = run(chunked, PROMPTS, GREEDY)
    whole = engine(model, enable_chunked_prefill=False, max_num_batched_tokens=128)
    tokens_whole, steps_whole = run(whole, PROMPTS, GREEDY)
    assert tokens == tokens_whole == reference
    # Chunking happened: prompts split over steps, chunks sharing steps with decodes.
    assert any(not s.samplers for st in steps for s in st.scheduled.scheduled)
    assert any(st.scheduled.num_decode_tokens and st.scheduled.num_prefill_tokens
               for st in steps)
    assert all(st.scheduled.num_tokens <= 16 for st in steps)
    assert all(s.samplers for st in steps_whole for s in st.scheduled.scheduled)


def test_preemption_by_recompute_keeps_the_outputs(model, reference):
    small = engine(model, num_blocks=16, max_num_batched_tokens=64)
    outs = small.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == reference
    assert small.stats.num_preemptions > 0
    assert sum(o.metrics.num_preemptions for o in outs) == small.stats.num_preemptions
    assert small.stats.peak_blocks_used <= 16
    assert small.block_manager.num_free_blocks == 16


def test_parallel_samples_fork_share_prompt_blocks_and_match_independent_runs(model):
    prompts = PROMPTS[:4]
    sp = SamplingParams(max_tokens=10, temperature=1.0, top_k=40, seed=11, n=3)
    llm = engine(model)
    reqs = [llm.add_request(p, sp) for p in prompts]
    checked = set()
    while llm.has_unfinished():
        llm.step()
        bm = llm.block_manager
        for r in reqs:
            live = [s for s in r.sequences if s.status is SequenceStatus.RUNNING]
            if r.request_id in checked or len(live) < 3:
                continue
            full = len(r.prompt_token_ids) // BLOCK
            tables = [bm.block_table(s.seq_id) for s in live]
            assert all(t[:full] == tables[0][:full] for t in tables)  # prompt blocks shared
            checked.add(r.request_id)
    assert checked == {r.request_id for r in reqs}
    assert llm.stats.num_cow_copies > 0  # partial prompt blocks were copied on write
    forked = [[s.output_token_ids for s in r.sequences] for r in reqs]
    assert all(len({tuple(t) for t in samples}) > 1 for samples in forked)  # really sampled
    # Sample i of a request with seed s is the single sample of a request with seed s + i.
    singles = engine(model).generate(
        [p for p in prompts for _ in range(3)],
        [SamplingParams(max_tokens=10, temperature=1.0, top_k=40, seed=11 + i)
         for _ in prompts for i in range(3)], use_tqdm=False)
    assert [t for samples in forked for t in samples] == [o.token_ids for o in singles]


def test_greedy_forks_all_equal_the_greedy_output(model, reference):
    outs = engine(model).generate(PROMPTS[:3], SamplingParams(max_tokens=MAX_TOKENS, n=2),
                                  use_tqdm=False)
    for o, want in zip(outs, reference):
        assert [c.token_ids for c in o.outputs] == [want, want]


COMPILE_CFG = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=160, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_size=16, seed=5)


def test_compiled_and_eager_engines_give_identical_tokens_with_at_most_two_graphs():
    """One full generate over every kind of step: prefill chunks, decodes, mixed steps,
    preemptions, forks with copy-on-write, single-token steps."""
    m = TinyLlama(COMPILE_CFG)
    rng = random.Random(4)
    prompts = [[rng.randrange(384) for _ in range(rng.randint(1, 50))] for _ in range(12)]
    params = [SamplingParams(max_tokens=rng.randint(1, 10), temperature=0.7 * (i % 2),
                             seed=i, n=1 + (i % 3 == 0)) for i in range(12)]
    kw = dict(num_blocks=24, block_size=4, max_num_batched_tokens=24, max_num_seqs=6)
    eager = LLM(m, compile=False, **kw)
    compiled = LLM(m, compile=True, **kw)
    want = eager.generate(prompts, params, use_tqdm=False)
    got = compiled.generate(prompts, params, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in got] == \
        [[c.token_ids for c in o.outputs] for o in want]
    assert compiled.stats.num_preemptions > 0 and compiled.stats.num_cow_copies > 0
    assert 1 <= compiled.num_compiled_graphs <= 2
    assert eager.num_compiled_graphs == 0


def run_recording_cascade(llm: LLM, prompts, params):
    """generate() by hand; per step (prefill tokens, decode tokens, cascade planned)."""
    reqs = [llm.add_request(p, sp) for p, sp in zip(prompts, params)]
    kinds = []
    while llm.has_unfinished():
        st = llm.step()
        if st.scheduled.scheduled:
            kinds.append((st.scheduled.num_prefill_tokens, st.scheduled.num_decode_tokens,
                          llm.runner.last_metadata.cascade is not None))
    return [[c.output_token_ids for c in r.sequences] for r in reqs], kinds


@pytest.mark.parametrize("cache_dtype", [None, torch.float8_e4m3fn])
def test_cascade_on_and_off_give_identical_tokens(model, reference, cache_dtype):
    """Prefix caching and chunked prefill on, greedy forks (n = 2): the same tokens with
    cascade attention as without, and cascade really ran, in mixed steps too."""
    params = [SamplingParams(max_tokens=MAX_TOKENS, n=1 + (i % 4 == 0)) for i in range(10)]
    kw = dict(max_num_batched_tokens=24, cache_dtype=cache_dtype)
    on, kinds = run_recording_cascade(engine(model, enable_cascade=True, **kw), PROMPTS, params)
    off, off_kinds = run_recording_cascade(engine(model, enable_cascade=False, **kw), PROMPTS,
                                           params)
    assert on == off
    if cache_dtype is None:
        assert [samples[0] for samples in on] == reference
        assert all(len(set(map(tuple, samples))) == 1 for samples in on)  # greedy forks agree
    assert not any(c for _, _, c in off_kinds)
    assert sum(c for _, _, c in kinds) >= 5
    assert any(c and prefill and decode for prefill, decode, c in kinds)  # a mixed step


def test_cascade_default_waits_for_a_worthwhile_group(model):
    """enable_cascade=None plans cascade only for a group meeting AUTO_CASCADE: 3 families
    sharing 4 blocks of 8 tokens never do; enough prompts sharing enough blocks do."""
    from torch_pagedkv.cache.step_plan import AUTO_CASCADE
    small = engine(model)
    small.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert small.stats.num_cascade_steps == 0
    rng = random.Random(5)
    blocks = -(-AUTO_CASCADE.min_shared_tokens // BLOCK) + 1
    system = [rng.randrange(CFG.vocab_size) for _ in range(blocks * BLOCK + 3)]
    prompts = [system + [rng.randrange(CFG.vocab_size) for _ in range(rng.randint(1, 9))]
               for _ in range(max(12, AUTO_CASCADE.min_seqs))]
    big = engine(model, num_blocks=512, max_num_batched_tokens=512)
    outs = big.generate(prompts, SamplingParams(max_tokens=4), use_tqdm=False)
    assert big.stats.num_cascade_steps >= 3
    plain = engine(model, num_blocks=512, max_num_batched_tokens=512, enable_cascade=False)
    assert [o.token_ids for o in outs] == \
        [o.token_ids for o in plain.generate(prompts, SamplingParams(max_tokens=4),
                                             use_tqdm=False)]


def test_compiled_cascade_adds_one_graph():
    """A compiled engine with cascade compiles one graph for plain steps and one for
    cascade steps, whatever the groups, and gives the eager plain engine's tokens."""
    m = TinyLlama(COMPILE_CFG)
    rng = random.Random(8)
    heads = [[rng.randrange(384) for _ in range(rng.randint(9, 30))] for _ in range(3)]
    prompts = [heads[i % 3] + [rng.randrange(384) for _ in range(rng.randint(1, 12))]
               for i in range(10)]
    params = [SamplingParams(max_tokens=rng.randint(2, 8), n=1 + (i == 4)) for i in range(10)]
    kw = dict(num_blocks=96, block_size=4, max_num_batched_tokens=24, max_num_seqs=6)
    torch._dynamo.reset()
    compiled = LLM(m, compile=True, enable_cascade=True, **kw)
    want, _ = run_recording_cascade(LLM(m, compile=False, enable_cascade=False, **kw),
                                    prompts, params)
    got, kinds = run_recording_cascade(compiled, prompts, params)
    assert got == want
    assert any(c for *_, c in kinds) and not all(c for *_, c in kinds)
    assert compiled.num_compiled_graphs == 2


def test_200_random_requests_leave_no_block_referenced(model):
    rng = random.Random(7)
    shared = [rng.randrange(CFG.vocab_size) for _ in range(24)]
    prompts, params = [], []
    for i in range(200):
        head = shared[:rng.randint(0, 24)] if rng.random() < 0.5 else []
        prompts.append(head + [rng.randrange(CFG.vocab_size) for _ in range(rng.randint(1, 40))])
        params.append(SamplingParams(
            max_tokens=rng.randint(1, 16), temperature=rng.choice([0.0, 0.9]),
            top_k=rng.choice([0, 5]), seed=i, n=rng.choice([1, 1, 2, 3]),
            stop_token_ids=rng.sample(range(CFG.vocab_size), 8)))
    llm = engine(model, num_blocks=40, block_size=4, max_num_batched_tokens=64,
                 max_num_seqs=12)
    outs = llm.generate(prompts, params, use_tqdm=False)
    bm = llm.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm._blocks)
    assert not llm.scheduler.running and not llm.scheduler.waiting
    assert llm.stats.num_preemptions > 0  # the cache was under pressure
    for o, sp in zip(outs, params):
        assert len(o.outputs) == sp.n
        for c in o.outputs:
            assert 1 <= len(c.token_ids) <= sp.max_tokens
            stops = [t for t in c.token_ids if t in sp.stop_token_ids]
            if c.finish_reason == "stop":
                assert stops == [c.token_ids[-1]]
            else:
                assert c.finish_reason == "length" and not stops
                assert len(c.token_ids) == sp.max_tokens


def test_prompts_arriving_together_compute_a_shared_prefix_once(model):
    """The demo's case: many prompts with one system prompt arrive at once. The first
    computes it; the others wait for its commit instead of computing it alongside."""
    rng = random.Random(3)
    system = [rng.randrange(CFG.vocab_size) for _ in range(50)]
    prompts = [system + [rng.randrange(CFG.vocab_size) for _ in range(rng.randint(3, 9))]
               for _ in range(6)]
    llm = engine(model, max_num_batched_tokens=256)
    outs = llm.generate(prompts, SamplingParams(max_tokens=3), use_tqdm=False)
    assert [o.metrics.num_cached_tokens for o in outs] == [0] + [48] * 5
    assert llm.stats.num_prefill_tokens == sum(map(len, prompts)) - 5 * 48
    off = engine(model, enable_prefix_caching=False).generate(
        prompts, SamplingParams(max_tokens=3), use_tqdm=False)
    assert [o.token_ids for o in outs] == [o.token_ids for o in off]


def test_memory_budget_sizes_the_cache(model):
    per_block = 2 * CFG.num_layers * BLOCK * CFG.num_kv_heads * CFG.head_size * 4
    llm = LLM(model, memory_bytes=100 * per_block + 5, block_size=BLOCK, compile=False)
    assert llm.kv_cache.num_blocks == llm.block_manager.num_blocks == 100
    assert llm.kv_cache.dtype == torch.float32 and llm.max_model_len == 800


def test_stop_tokens_and_max_model_len_end_a_sequence(model, reference):
    want = reference[0]
    stop = want[4]
    out = engine(model).generate([PROMPTS[0]], SamplingParams(max_tokens=MAX_TOKENS,
                                                              stop_token_ids=[stop]),
                                 use_tqdm=False)[0]
    assert out.token_ids == want[:want.index(stop) + 1]
    assert out.outputs[0].finish_reason == "stop"
    limit = len(PROMPTS[0]) + 5
    out = engine(model, max_model_len=limit).generate([PROMPTS[0]], GREEDY, use_tqdm=False)[0]
    assert out.token_ids == want[:5] and out.outputs[0].finish_reason == "length"


def test_metrics_are_measured(model):
    outs = engine(model).generate(PROMPTS, GREEDY, use_tqdm=False)
    for o in outs:
        m = o.metrics
        assert 0 < m.time_to_first_token <= m.latency
        assert m.num_prompt_tokens == len(o.prompt_token_ids)
        assert m.num_cached_tokens % BLOCK == 0 and m.num_preemptions == 0


def test_bad_requests_are_rejected_with_a_reason(model):
    llm = engine(model, num_blocks=4, max_model_len=64)
    with pytest.raises(ValueError, match="at least one token"):
        llm.add_request([])
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        llm.add_request([512])
    with pytest.raises(ValueError, match="max_model_len"):
        llm.add_request(list(range(70)))
    assert llm.max_model_len == 32  # capped to what the cache (4 blocks of 8) can hold
    with pytest.raises(ValueError, match="max_model_len is 32"):
        llm.add_request(list(range(40)))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_hugging_face_models_are_detected_without_importing_transformers():
    base = type("PreTrainedModel", (torch.nn.Module,), {"__module__": "transformers.modeling_utils"})
    hf_like = type("LlamaForCausalLM", (base,), {"__module__": "transformers.models.llama"})
    assert is_hf_model(hf_like()) and not is_hf_model(TinyLlama(CFG))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_step_never_waits_for_the_device():
    m = TinyLlama(CFG, device="cuda")
    llm = LLM(m, num_blocks=64, block_size=BLOCK, compile=False)
    for p in PROMPTS[:4]:
        llm.add_request(p, SamplingParams(max_tokens=6, n=2, temperature=0.8, seed=1))
    llm.step()  # warm-up: lazy CUDA init may synchronise
    while llm.has_unfinished():
        out = llm.scheduler.schedule()
        torch.cuda.set_sync_debug_mode("error")
        try:
            sampled = llm.runner.execute(out)  # planning, copies, model, sampling
        finally:
            torch.cuda.set_sync_debug_mode("default")
        llm.scheduler.update(out, [] if sampled is None else sampled.tolist(), 0.0)
