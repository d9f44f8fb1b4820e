"""Hugging Face transformers models on the pagedkv kernels, model code unchanged.

Specification: for Llama (GQA), Mistral (sliding window), Gemma-2 (softcap, alternating
sliding/global layers) and Qwen2 (biases), with head dims 32..256, greedy generation
through "pagedkv" attention gives exactly the tokens of transformers' own eager
attention: under HF's generate (with our PagedCache, and with HF's DynamicCache), for
single prompts and left-padded batches, and through the engine (LLM(hf_model)) with
prefix caching, chunked prefill, mixed batches and preemption. Models are tiny random
configs built locally; nothing is downloaded.
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never touch a hub

import subprocess
import sys
from contextlib import contextmanager
from functools import lru_cache

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (AutoModelForCausalLM, Gemma2Config, LlamaConfig,  # noqa: E402
                          MistralConfig, Qwen2Config)

from torch_pagedkv.cache.block_manager import BlockManager, NoFreeBlocksError  # noqa: E402
from torch_pagedkv.cache.kv_cache import KVCache  # noqa: E402
from torch_pagedkv.integrations import hf  # noqa: E402
from torch_pagedkv.layers.metadata import AttentionMetadata  # noqa: E402
from torch_pagedkv.models.base import PagedModel  # noqa: E402

NEW_TOKENS = 32
VOCAB = 384
_COMMON = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
               max_position_embeddings=256, initializer_range=0.1,
               pad_token_id=0, bos_token_id=None, eos_token_id=None)

# name -> (config factory, prompt lengths). Head dims: 32, 128, 256, 64.
VARIANTS = {
    "llama-gqa": (lambda: LlamaConfig(**_COMMON, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=32), (9, 27, 45)),
    "mistral-window32": (lambda: MistralConfig(**_COMMON, num_hidden_layers=2,
                                               num_attention_heads=2, num_key_value_heads=1,
                                               head_dim=128, sliding_window=32), (41, 48, 57)),
    "gemma2-softcap": (lambda: Gemma2Config(**_COMMON, num_hidden_layers=4,
                                            num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=256, sliding_window=16,
                                            attn_logit_softcapping=5.0,
                                            tie_word_embeddings=False), (9, 27, 45)),
    "qwen2-bias": (lambda: Qwen2Config(**_COMMON, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=1), (9, 27, 45)),
}
HEAD_DIMS = {"llama-gqa": 32, "mistral-window32": 128, "gemma2-softcap": 256, "qwen2-bias": 64}
variants = pytest.mark.parametrize("variant", list(VARIANTS))


def build_model(config, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # Qwen2's from_config zeroes its q/k/v biases: make them matter
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return model


@lru_cache(maxsize=None)
def model_for(variant: str):
    return build_model(VARIANTS[variant][0]())


@lru_cache(maxsize=None)
def prompts_for(variant: str) -> tuple[tuple[int, ...], ...]:
    gen = torch.Generator().manual_seed(7)
    return tuple(tuple(torch.randint(1, VOCAB, (n,), generator=gen).tolist())
                 for n in VARIANTS[variant][1])


@contextmanager
def attn(model, name: str):
    old = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(old)


def left_pad(prompts) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def greedy(model, ids, mask=None, new_tokens=NEW_TOKENS, **kwargs) -> list[list[int]]:
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                             do_sample=False, **kwargs)
    return out[:, ids.shape[1]:].tolist()


@lru_cache(maxsize=None)
def eager_tokens(variant: str, prompt: tuple[int, ...]) -> tuple[int, ...]:
    with attn(model_for(variant), "eager") as model:
        return tuple(greedy(model, torch.tensor([prompt]))[0])


@lru_cache(maxsize=None)
def eager_batch_tokens(variant: str) -> tuple[tuple[int, ...], ...]:
    ids, mask = left_pad(prompts_for(variant))
    with attn(model_for(variant), "eager") as model:
        return tuple(map(tuple, greedy(model, ids, mask)))


def paged_cache(model, rows: int = 1, blocks_per_row: int = 16, block_size: int = 8):
    return hf.PagedCache.for_model(model, num_blocks=rows * blocks_per_row, block_size=block_size)


# ---------------------------------------------------------------- HF's own generate
@variants
def test_generate_with_paged_cache_matches_eager(variant):
    model = model_for(variant)
    with attn(model, "pagedkv"):
        for prompt in prompts_for(variant):
            cache = paged_cache(model)
            got = greedy(model, torch.tensor([prompt]), past_key_values=cache)[0]
            want = eager_tokens(variant, prompt)
            assert len(set(want)) >= 8, "degenerate reference: the comparison would prove little"
            assert tuple(got) == want
            # the K/V really live in our blocks: prompt + generated tokens (the last
            # sampled one is never fed back)
            used = cache.block_manager.num_blocks - cache.num_free_blocks
            assert used == -(-(len(prompt) + NEW_TOKENS - 1) // cache.block_size)


@variants
def test_left_padded_batch_matches_eager(variant):
    model = model_for(variant)
    ids, mask = left_pad(prompts_for(variant))
    assert not bool(mask.all())
    with attn(model, "pagedkv"):
        got = greedy(model, ids, mask, past_key_values=paged_cache(model, rows=len(ids)))
    assert tuple(map(tuple, got)) == eager_batch_tokens(variant)


@variants
def test_dynamic_cache_path_matches_eager(variant):
    """Without a PagedCache (HF's default DynamicCache) attention still runs on the kernels."""
    model = model_for(variant)
    ids, mask = left_pad(prompts_for(variant))
    with attn(model, "pagedkv"):
        got = greedy(model, ids, mask)
    assert tuple(map(tuple, got)) == eager_batch_tokens(variant)


@variants
def test_first_step_logits_match_eager(variant):
    model = model_for(variant)
    ids, mask = left_pad(prompts_for(variant))
    real = mask.bool()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits[real]
        with attn(model, "pagedkv"):
            paged = model(ids, attention_mask=mask,
                          past_key_values=paged_cache(model, rows=len(ids))).logits[real]
            dense = model(ids, attention_mask=mask).logits[real]
    torch.testing.assert_close(paged, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dense, want, atol=1e-4, rtol=1e-4)


def test_beam_search_forks_blocks_and_matches_eager():
    """Beam search reorders rows every step: PagedCache forks sequences (shared blocks,
    copy-on-write of the partial last block)."""
    model = model_for("llama-gqa")
    prompt = torch.tensor([prompts_for("llama-gqa")[1]])
    kwargs = dict(num_beams=3, num_return_sequences=3, new_tokens=12)
    want = greedy(model, prompt, **kwargs)
    with attn(model, "pagedkv"):
        cache = paged_cache(model, rows=3)
        got = greedy(model, prompt, past_key_values=cache, **kwargs)
    assert got == want


def test_second_generate_continues_the_paged_cache():
    """A second generate() on the same cache (a chat turn) feeds only the new columns."""
    model = model_for("llama-gqa")
    ids, mask = left_pad(prompts_for("llama-gqa"))
    turn = torch.randint(1, VOCAB, (len(ids), 5), generator=torch.Generator().manual_seed(3))
    outs = {}
    for name in ("eager", "pagedkv"):
        cache = (transformers.DynamicCache(config=model.config) if name == "eager"
                 else paged_cache(model, rows=len(ids)))
        with attn(model, name), torch.no_grad():
            first = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                   past_key_values=cache)
            ids2 = torch.cat([first, turn], 1)
            mask2 = torch.cat([mask, torch.ones_like(ids2[:, mask.shape[1]:])], 1)
            outs[name] = model.generate(ids2, attention_mask=mask2, max_new_tokens=8,
                                        do_sample=False, past_key_values=cache)
    assert torch.equal(outs["pagedkv"], outs["eager"])


@pytest.mark.parametrize("head_dim", [40, 80, 96, 192])
def test_head_dims(head_dim):
    config = LlamaConfig(**_COMMON, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=head_dim)
    model = build_model(config, seed=head_dim)
    ids, mask = left_pad(prompts_for("llama-gqa")[:2])
    want = greedy(model, ids, mask, new_tokens=12)
    with attn(model, "pagedkv"):
        got = greedy(model, ids, mask, new_tokens=12,
                     past_key_values=paged_cache(model, rows=2))
    assert got == want


# ---------------------------------------------------------------- as_paged_model
def run_paged_model(pm, prompts, new_tokens, bm, kv, chunk=8):
    """A minimal scheduler over PagedModel: every live sequence advances each step (a
    prefill chunk of up to `chunk` tokens, or one decode token) in one flat mixed
    batch. Returns (generated tokens per prompt, prefix tokens reused per prompt,
    first-step logits of the first prompt's last token)."""
    bs = bm.block_size
    seqs = []
    for i, p in enumerate(prompts):
        sid = object()
        seqs.append({"id": sid, "tokens": list(p), "done": bm.allocate(sid, p), "out": []})
    reused = [s["done"] for s in seqs]
    first_logits = None
    while any(len(s["out"]) < new_tokens for s in seqs):
        live = [s for s in seqs if len(s["out"]) < new_tokens]
        ids, pos, slots, tables, lens, qsl = [], [], [], [], [], [0]
        for s in live:
            c = s["done"]
            n = min(chunk, len(s["tokens"]) - c)
            table = bm.block_table(s["id"])
            ids += s["tokens"][c:c + n]
            pos += range(c, c + n)
            slots += [table[p // bs] * bs + p % bs for p in range(c, c + n)]
            tables.append(table)
            lens.append(c + n)
            qsl.append(qsl[-1] + n)
        width = max(len(t) for t in tables)
        md = AttentionMetadata(
            torch.tensor(slots), torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                              dtype=torch.int32),
            torch.tensor(lens, dtype=torch.int32), torch.tensor(qsl, dtype=torch.int32))
        hidden = pm.forward(torch.tensor(ids), torch.tensor(pos), kv.kv_caches, md)
        logits = pm.compute_logits(hidden[torch.tensor(qsl[1:]) - 1])
        for s, done, row in zip(live, lens, logits):
            s["done"] = done
            bm.commit(s["id"], done)
            if s["done"] == len(s["tokens"]):  # the whole context is cached: sample
                if first_logits is None and s is seqs[0]:
                    first_logits = row
                tok = int(row.argmax())
                s["out"].append(tok)
                if len(s["out"]) < new_tokens:
                    s["tokens"].append(tok)
                    bm.append(s["id"], [tok])
    for s in seqs:
        bm.free(s["id"])
    return [s["out"] for s in seqs], reused, first_logits


@variants
def test_paged_model_mixed_batches_prefix_cache_match_eager(variant):
    model = model_for(variant)
    a, b, c = prompts_for(variant)
    shared = c[:16] + b[16:]  # two full 8-token blocks of c's prefix, then b's tokens
    pm = hf.as_paged_model(model)
    assert isinstance(pm, PagedModel)
    try:
        bm = BlockManager(96, 8, enable_prefix_caching=True)
        kv = KVCache(pm.num_layers, pm.num_kv_heads, pm.head_size, 8, num_blocks=96,
                     dtype=pm.dtype)
        (out_c,), _, logits_c = run_paged_model(pm, [c], NEW_TOKENS, bm, kv)
        (out_s, out_a), reused, _ = run_paged_model(pm, [shared, a], NEW_TOKENS, bm, kv)
    finally:
        model.set_attn_implementation("eager")
    assert reused == [16, 0]  # the shared prefix came from the cache
    assert tuple(out_c) == eager_tokens(variant, c)
    assert tuple(out_s) == eager_tokens(variant, shared)
    assert tuple(out_a) == eager_tokens(variant, a)
    with torch.no_grad():
        want = model(torch.tensor([c])).logits[0, -1]
    torch.testing.assert_close(logits_c, want, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- the engine
def _engine():
    try:
        from torch_pagedkv.engine import LLM, SamplingParams
    except ImportError as e:
        pytest.skip(f"torch_pagedkv.engine not available: {e}")
    return LLM, SamplingParams


@variants
def test_llm_engine_prefix_cache_matches_eager(variant):
    LLM, SamplingParams = _engine()
    model = model_for(variant)
    a, b, c = prompts_for(variant)
    shared = c[:16] + b[16:]
    params = SamplingParams(max_tokens=NEW_TOKENS)
    try:
        llm = LLM(model, num_blocks=128, block_size=8, enable_prefix_caching=True,
                  max_num_batched_tokens=24, compile=False)  # 24: prompts prefill in chunks
        first = llm.generate([c], params, use_tqdm=False)
        hits_before = llm.block_manager.stats.hits
        rest = llm.generate([shared, a], params, use_tqdm=False)
    finally:
        model.set_attn_implementation("eager")
    assert llm.block_manager.stats.hits - hits_before == 16
    got = [tuple(r.outputs[0].token_ids) for r in first + rest]
    assert got == [eager_tokens(variant, p) for p in (c, shared, a)]


def test_llm_engine_preemption_matches_eager():
    """Too few blocks for three sequences at once: the engine preempts and recomputes."""
    LLM, SamplingParams = _engine()
    variant = "gemma2-softcap"
    model = model_for(variant)
    prompts = prompts_for(variant)
    try:
        llm = LLM(model, num_blocks=14, block_size=8, enable_prefix_caching=True,
                  max_num_batched_tokens=64, compile=False)
        outs = llm.generate(list(prompts), SamplingParams(max_tokens=NEW_TOKENS), use_tqdm=False)
    finally:
        model.set_attn_implementation("eager")
    assert llm.stats.num_preemptions > 0
    assert [tuple(r.outputs[0].token_ids) for r in outs] == [eager_tokens(variant, p)
                                                            for p in prompts]


def test_llm_engine_compiled_matches_eager():
    """The engine's default: the HF model under torch.compile(fullgraph=True,
    dynamic=True), one graph for every step. The "eager" backend checks the capture
    without inductor's C++ build time."""
    LLM, SamplingParams = _engine()
    variant = "gemma2-softcap"
    model = model_for(variant)
    prompts = prompts_for(variant)
    try:
        llm = LLM(model, num_blocks=64, block_size=8, max_num_batched_tokens=24,
                  compile=True, compile_backend="eager")
        outs = llm.generate(list(prompts), SamplingParams(max_tokens=NEW_TOKENS), use_tqdm=False)
    finally:
        model.set_attn_implementation("eager")
    assert llm.num_compiled_graphs == 1
    assert [tuple(r.outputs[0].token_ids) for r in outs] == [eager_tokens(variant, p)
                                                            for p in prompts]


# ---------------------------------------------------------------- contract edges
def test_paged_cache_rejects_what_it_cannot_honour():
    model = model_for("llama-gqa")
    ids, mask = left_pad(prompts_for("llama-gqa"))
    with attn(model, "pagedkv"), torch.no_grad():
        with pytest.raises(NoFreeBlocksError):  # 3 rows of up to 45 tokens in 4 blocks
            model(ids, attention_mask=mask, past_key_values=paged_cache(model, 1, 4))
        cache = paged_cache(model, rows=3)
        model(ids, attention_mask=mask, past_key_values=cache)
        with pytest.raises(ValueError, match="batch"):  # same cache, other batch size
            model(ids[:2, -1:], past_key_values=cache)
        cache.reset()
        assert cache.num_free_blocks == cache.block_manager.num_blocks
        four_d = torch.zeros(1, 1, 5, 5)
        with pytest.raises(ValueError, match="2-D padding mask"):
            hf.attention_forward(model.model.layers[0].self_attn, torch.zeros(1, 4, 5, 32),
                                 torch.zeros(1, 2, 5, 32), torch.zeros(1, 2, 5, 32), four_d)


def test_import_torch_pagedkv_never_needs_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import torch_pagedkv, torch_pagedkv.integrations\n"
            "try:\n    import torch_pagedkv.integrations.hf\n"
            "except ImportError as e:\n    assert 'torch_pagedkv[hf]' in str(e), e\n"
            "else:\n    raise SystemExit('imported without transformers')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env, timeout=120)
