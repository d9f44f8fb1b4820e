"""The tiny Llama: deterministic weights, textbook RoPE, and paged forward == dense forward."""
import pytest
import torch
import torch.nn.functional as F

from dense_llama import dense_logits
from torch_pagedkv.cache.kv_cache import KVCache
from torch_pagedkv.layers import AttentionMetadata
from torch_pagedkv.models import LlamaConfig, PagedModel, TinyLlama
from torch_pagedkv.models.llama import RotaryEmbedding

CFG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_size=16, max_position=512)


def paged_step(model, kv, table, start, ids):
    """Feed ids at positions [start, start + len) of one sequence; returns their logits."""
    n, bs = len(ids), kv.block_size
    pos = torch.arange(start, start + n)
    md = AttentionMetadata(
        torch.tensor([table[p // bs] * bs + p % bs for p in pos.tolist()]),
        torch.tensor([table], dtype=torch.int32), torch.tensor([start + n], dtype=torch.int32),
        torch.tensor([0, n], dtype=torch.int32))
    return model.compute_logits(model(torch.tensor(ids), pos, kv.kv_caches, md))


def test_weights_are_a_function_of_the_seed():
    a, b = TinyLlama(CFG), TinyLlama(CFG)
    c = TinyLlama(LlamaConfig(**{**CFG.__dict__, "seed": 1}))
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_implements_the_paged_model_protocol():
    m = TinyLlama(CFG, dtype=torch.bfloat16)
    assert isinstance(m, PagedModel)
    assert (m.num_layers, m.num_kv_heads, m.head_size, m.vocab_size, m.dtype) == (
        2, 2, 16, 256, torch.bfloat16)


def test_rope_is_the_textbook_rotation():
    d, theta = 16, 10000.0
    rope = RotaryEmbedding(d, 64, theta)
    x = torch.randn(5, 3, d)
    pos = torch.tensor([0, 1, 7, 30, 63])
    got = rope(pos, x)
    # pairs (i, i + d/2) as complex numbers, multiplied by e^{i p theta^(-2i/d)}
    z = torch.complex(x[..., : d // 2], x[..., d // 2:])
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    rot = torch.polar(torch.ones(5, 1, d // 2, dtype=torch.float64),
                      pos.view(5, 1, 1).double() * freq)
    zr = z * rot.to(torch.complex64)
    torch.testing.assert_close(got, torch.cat([zr.real, zr.imag], -1), atol=1e-5, rtol=1e-5)
    assert torch.equal(got[0], x[0])  # position 0: no rotation


@torch.inference_mode()
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (4, 1)])
def test_paged_prefill_chunks_and_decodes_equal_the_dense_model(heads, kv_heads):
    cfg = LlamaConfig(**{**CFG.__dict__, "num_heads": heads, "num_kv_heads": kv_heads})
    model = TinyLlama(cfg)
    kv = KVCache(cfg.num_layers, kv_heads, cfg.head_size, 8, num_blocks=10, dtype=torch.float32)
    table = [7, 2, 9, 0, 5]
    ids = torch.randint(0, cfg.vocab_size, (37,), generator=torch.Generator().manual_seed(0))
    ids = ids.tolist()
    want = dense_logits(model, ids)
    got = torch.cat([paged_step(model, kv, table, 0, ids[:13]),  # prefill chunk
                     paged_step(model, kv, table, 13, ids[13:30])]  # chunk over a prefix
                    + [paged_step(model, kv, table, p, ids[p:p + 1]) for p in range(30, 37)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert got.dtype == torch.float32 and got.shape == (37, cfg.vocab_size)


@torch.inference_mode()
def test_bfloat16_model_tracks_float32():
    ids = list(range(3, 40))
    m32, m16 = TinyLlama(CFG), TinyLlama(CFG, dtype=torch.bfloat16)
    outs = []
    for m in (m32, m16):
        kv = KVCache(CFG.num_layers, CFG.num_kv_heads, CFG.head_size, 16, num_blocks=4,
                     dtype=m.dtype)
        outs.append(paged_step(m, kv, [1, 3, 0], 0, ids))
    assert outs[1].dtype == torch.float32  # logits are float32 whatever the model dtype
    cos = F.cosine_similarity(outs[0], outs[1], dim=-1)
    assert cos.min() > 0.98


@torch.inference_mode()
def test_random_model_is_not_degenerate():
    """Greedy continuations depend on the prompt (tests of the engine then mean something)."""
    model = TinyLlama(CFG)
    firsts = {int(dense_logits(model, [t, t + 1, t + 2])[-1].argmax()) for t in range(0, 200, 10)}
    assert len(firsts) >= 10
