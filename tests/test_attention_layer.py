"""PagedAttention: writes the new tokens' K/V, then attends through the paged cache.

Specification: over any split of sequences into steps, its outputs equal dense causal
attention over the whole sequences; it takes 2-D, 3-D and strided fused-QKV views
without copying; its options match the reference op semantics.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import DEVICES
from torch_pagedkv import reference
from torch_pagedkv.layers import AttentionMetadata, PagedAttention

BLOCK = 8


def dense_causal(q, k, v, scale):
    """q [L, H, D], k/v [L, KV, D] -> [L, H, D]: plain causal attention (GQA by repeat)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         is_causal=True, scale=scale)
    return out.transpose(0, 1)


def plan(chunks, tables, device):
    """chunks: (start, end) of the new tokens of each sequence -> AttentionMetadata."""
    slots, lens, qsl = [], [], [0]
    for (start, end), table in zip(chunks, tables):
        slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, end)]
        lens.append(end)
        qsl.append(qsl[-1] + end - start)
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return AttentionMetadata(torch.tensor(slots, dtype=torch.int64, device=device),
                             bt.to(device), torch.tensor(lens, dtype=torch.int32, device=device),
                             torch.tensor(qsl, dtype=torch.int32, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (4, 1)])
def test_steps_of_any_split_equal_dense_causal_attention(heads, kv_heads, device):
    """Prefill, chunked prefill over a computed prefix and decode, mixed in two steps."""
    torch.manual_seed(0)
    d = 32
    lengths = [19, 7, 33]
    splits = [11, 6, 32]  # step 1 computes [0, split), step 2 the rest (33 -> a decode)
    layer = PagedAttention(heads, d, kv_heads)
    seqs = [(torch.randn(n, heads, d), torch.randn(n, kv_heads, d), torch.randn(n, kv_heads, d))
            for n in lengths]
    perm = torch.randperm(20).tolist()  # scattered physical blocks
    tables, used = [], 0
    for n in lengths:
        nb = -(-n // BLOCK)
        tables.append(perm[used:used + nb])
        used += nb
    cache = (torch.zeros(20, BLOCK, kv_heads, d, device=device),
             torch.zeros(20, BLOCK, kv_heads, d, device=device))
    for chunks in ([(0, s) for s in splits], [(s, n) for s, n in zip(splits, lengths)]):
        md = plan(chunks, tables, device)
        cat = [torch.cat([x[a:b] for x, (a, b) in zip(xs, chunks)]) for xs in zip(*seqs)]
        out = layer(*(t.to(device) for t in cat), cache, md).cpu()
        assert out.shape == (md.num_tokens, heads * d)
        row = 0
        for (q, k, v), (a, b) in zip(seqs, chunks):
            want = dense_causal(q, k, v, d ** -0.5)[a:b].flatten(1)
            torch.testing.assert_close(out[row:row + b - a], want, atol=2e-5, rtol=1e-5)
            row += b - a


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_fused_qkv_views_are_taken_without_copies():
    torch.manual_seed(1)
    heads, kv_heads, d, n = 8, 2, 64, 13
    layer = PagedAttention(heads, d, kv_heads)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * d)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)  # strided 2-D views
    assert not q.is_contiguous() and not v.is_contiguous()
    cache = (torch.zeros(4, BLOCK, kv_heads, d), torch.zeros(4, BLOCK, kv_heads, d))
    md = plan([(0, n)], [[2, 0]], "cpu")
    with OpLog() as log:
        out = layer(q, k, v, cache, md)
    copies = [name for name in log.names
              if any(w in name for w in ("clone", "copy", "contiguous", "_to_copy"))]
    assert copies == [], f"PagedAttention copied its inputs: {copies}"
    assert "pagedkv.reshape_and_cache.default" in log.names
    # Same result as contiguous 3-D inputs.
    cache2 = (torch.zeros_like(cache[0]), torch.zeros_like(cache[1]))
    q3, k3, v3 = (t.contiguous().unflatten(-1, (-1, d)) for t in (q, k, v))
    torch.testing.assert_close(out, layer(q3, k3, v3, cache2, md), atol=0, rtol=0)
    torch.testing.assert_close(cache[0], cache2[0], atol=0, rtol=0)


@pytest.mark.parametrize("option", ["sliding_window", "alibi", "softcap", "scale"])
def test_options_match_the_reference_op(option):
    torch.manual_seed(2)
    heads, kv_heads, d = 4, 2, 16
    kwargs = {"sliding_window": dict(sliding_window=5),
              "alibi": dict(alibi_slopes=[2 ** -(i + 1) for i in range(heads)]),
              "softcap": dict(softcap=3.0), "scale": dict(scale=0.3)}[option]
    layer = PagedAttention(heads, d, kv_heads, **kwargs)
    lengths, tables = [12, 20], [[3, 1], [0, 4, 2]]
    q = torch.randn(sum(lengths), heads, d) * 2
    k, v = torch.randn(sum(lengths), kv_heads, d), torch.randn(sum(lengths), kv_heads, d)
    md = plan([(0, n) for n in lengths], tables, "cpu")
    cache = (torch.zeros(5, BLOCK, kv_heads, d), torch.zeros(5, BLOCK, kv_heads, d))
    out = layer(q, k, v, cache, md)
    ref_cache = (torch.zeros_like(cache[0]), torch.zeros_like(cache[1]))
    reference.reshape_and_cache(k, v, *ref_cache, md.slot_mapping)
    slopes = kwargs.get("alibi_slopes")
    want = reference.paged_attention(
        q, *ref_cache, md.block_table, md.seq_lens, md.query_start_loc,
        kwargs.get("scale", d ** -0.5),
        None if slopes is None else torch.tensor(slopes, dtype=torch.float32),
        kwargs.get("sliding_window", -1), kwargs.get("softcap", 0.0))
    torch.testing.assert_close(out, want.flatten(1), atol=2e-5, rtol=1e-5)
    if option == "sliding_window":  # the option must matter on this input
        plain = PagedAttention(heads, d, kv_heads)(q, k, v, ref_cache, md)
        assert not torch.allclose(plain, out)


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_cache_with_scales_matches_the_reference(cache_dtype):
    torch.manual_seed(3)
    heads, kv_heads, d, n = 4, 2, 32, 21
    layer = PagedAttention(heads, d, kv_heads)
    q, k, v = torch.randn(n, heads, d), torch.randn(n, kv_heads, d) * 4, torch.randn(n, kv_heads, d)
    k_scale, v_scale = torch.tensor([0.25]), torch.tensor([0.05])
    md = plan([(0, n)], [[1, 3, 0]], "cpu")
    cache = (torch.zeros(4, BLOCK, kv_heads, d, dtype=cache_dtype),
             torch.zeros(4, BLOCK, kv_heads, d, dtype=cache_dtype))
    out = layer(q, k, v, cache, md, k_scale, v_scale)
    ref = (torch.zeros_like(cache[0]), torch.zeros_like(cache[1]))
    reference.reshape_and_cache(k, v, *ref, md.slot_mapping, k_scale, v_scale)
    assert torch.equal(cache[0].view(torch.uint8), ref[0].view(torch.uint8))
    want = reference.paged_attention(q, *ref, md.block_table, md.seq_lens, md.query_start_loc,
                                     d ** -0.5, k_scale=k_scale, v_scale=v_scale)
    torch.testing.assert_close(out, want.flatten(1), atol=1e-4, rtol=1e-4)


def test_padding_slots_are_not_written():
    layer = PagedAttention(2, 8, 2)
    cache = (torch.zeros(2, BLOCK, 2, 8), torch.zeros(2, BLOCK, 2, 8))
    md = AttentionMetadata(torch.tensor([0, -1]), torch.zeros(2, 1, dtype=torch.int32),
                           torch.tensor([1, 1], dtype=torch.int32),
                           torch.tensor([0, 1, 2], dtype=torch.int32))
    layer(torch.randn(2, 16), torch.ones(2, 16), torch.ones(2, 16), cache, md)
    assert cache[0][0, 0].eq(1).all() and cache[0].sum() == 16  # only slot 0


def test_compiles_fullgraph_dynamic_and_matches_eager():
    torch.manual_seed(4)
    layer = PagedAttention(4, 16, 2)
    fn = torch.compile(layer, fullgraph=True, dynamic=True)
    for n, table in ((5, [1]), (11, [0, 2])):
        q, k, v = torch.randn(n, 64), torch.randn(n, 32), torch.randn(n, 32)
        md = plan([(0, n)], [table], "cpu")
        c1 = (torch.zeros(3, BLOCK, 2, 16), torch.zeros(3, BLOCK, 2, 16))
        c2 = (torch.zeros(3, BLOCK, 2, 16), torch.zeros(3, BLOCK, 2, 16))
        torch.testing.assert_close(fn(q, k, v, c1, md), layer(q, k, v, c2, md))
        assert torch.equal(c1[0], c2[0]) and torch.equal(c1[1], c2[1])  # the write happened


def test_bad_shapes_say_what_is_expected():
    layer = PagedAttention(4, 16, 2)
    md = plan([(0, 3)], [[0]], "cpu")
    cache = (torch.zeros(1, BLOCK, 2, 16), torch.zeros(1, BLOCK, 2, 16))
    with pytest.raises(ValueError, match=r"key must be \[num_tokens, 32\]"):
        layer(torch.randn(3, 64), torch.randn(3, 48), torch.randn(3, 32), cache, md)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        PagedAttention(4, 16, 3)
    with pytest.raises(ValueError, match="one slope per head"):
        PagedAttention(4, 16, 2, alibi_slopes=[1.0])
    assert math.isclose(PagedAttention(4, 16).scale, 0.25)
