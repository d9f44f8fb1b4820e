"""Cascade (shared-prefix) attention, docs/design.md §2.

paged_attention_lse and merge_attn_states against the reference: every dtype, fp8
caches, head and block sizes, GQA, empty groups, q_len-0 rows and rows that see no key
(lse = -inf). Then the cascade itself, as the layer runs it (a prefix pass, a suffix
pass and a merge, planned by the StepPlanner): for random batches with random prefix
groups it equals paged_attention over the whole sequences.
"""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import torch_pagedkv as pk
from torch_pagedkv import reference
from torch_pagedkv.cache import StepPlanner
from torch_pagedkv.cache.step_plan import ALWAYS_CASCADE
from torch_pagedkv.layers.attention import cascade_attention, write_and_attend
from conftest import DEVICES
from paged_inputs import (ATOL, FLOAT_DTYPES, FP8_DTYPES, make_batch, prefix_group_rows,
                          random_cache)

MIXED = [(1, 37), (5, 5), (0, 20), (3, 100), (17, 50), (1, 1)]
# causal=False: more query rows than keys, an empty sequence (an empty group), q_len 0.
PREFIX_PASS = [(7, 37), (5, 0), (40, 20), (0, 5), (64, 48), (1, 16)]
LSE_ATOL = 2e-3  # lse is a float32 log of a float32 sum: tight whatever the dtype


def host(kw):
    return {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()}


def check_lse(batch, dtype, causal=True, atol=None, **kw):
    """paged_attention_lse against the reference; with causal=True its out is exactly
    paged_attention's."""
    scale = 1.0 / math.sqrt(batch.query.shape[-1])
    args = batch.attention_args()
    kw.setdefault("k_scale", batch.k_scale)
    kw.setdefault("v_scale", batch.v_scale)
    out, lse = pk.paged_attention_lse(*args, scale, causal=causal, **kw)
    ref_out, ref_lse = reference.paged_attention_lse(*[a.cpu() for a in args], scale,
                                                     causal=causal, **host(kw))
    assert out.shape == batch.query.shape and out.dtype == batch.query.dtype
    assert lse.shape == batch.query.shape[:2] and lse.dtype == torch.float32
    torch.testing.assert_close(out.cpu().float(), ref_out.float(), atol=atol or ATOL[dtype],
                               rtol=0)
    none = ref_lse == -math.inf
    assert torch.equal(lse.cpu() == -math.inf, none)  # exactly the rows that saw no key
    torch.testing.assert_close(lse.cpu()[~none], ref_lse[~none], atol=LSE_ATOL, rtol=0)
    assert not out.cpu()[none].any()
    if causal:
        assert torch.equal(out, pk.paged_attention(*args, scale, **kw))
    return out, lse


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("head_size", [64, 128, 256, 40])
@pytest.mark.parametrize("block_size", [8, 16, 32, 5])
def test_lse_shapes_and_dtypes(device, causal, dtype, head_size, block_size):
    seqs = MIXED if causal else PREFIX_PASS
    batch = make_batch(seqs, 8, 2, head_size, block_size, dtype, device=device,
                       seed=head_size * 100 + block_size)
    check_lse(batch, dtype, causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("cache_dtype", FP8_DTYPES)
def test_lse_fp8_caches(device, causal, dtype, cache_dtype):
    seqs = MIXED if causal else PREFIX_PASS
    batch = make_batch(seqs, 8, 4, 128, 16, dtype, cache_dtype, device=device)
    check_lse(batch, dtype, causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (8, 2), (32, 8), (16, 1), (6, 3)])
def test_lse_gqa(device, causal, num_heads, num_kv_heads):
    seqs = MIXED if causal else PREFIX_PASS
    check_lse(make_batch(seqs, num_heads, num_kv_heads, 64, 16, torch.float32, device=device),
              torch.float32, causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("feature", [
    dict(sliding_window=7), dict(softcap=3.0), dict(alibi_slopes="random"),
    dict(sliding_window=9, softcap=2.0, alibi_slopes="random")])
def test_lse_features_causal(device, feature):
    batch = make_batch(MIXED, 8, 2, 64, 16, torch.bfloat16, device=device, seed=7)
    kw = dict(feature)
    if kw.get("alibi_slopes") == "random":
        kw["alibi_slopes"] = torch.rand(8, generator=torch.Generator().manual_seed(1)).to(device)
    check_lse(batch, torch.bfloat16, **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_lse_softcap_without_causality(device):
    batch = make_batch(PREFIX_PASS, 8, 2, 64, 16, torch.float16, device=device, seed=3)
    check_lse(batch, torch.float16, causal=False, softcap=4.0)


@pytest.mark.parametrize("device", DEVICES)
def test_rows_that_see_no_key_get_zero_and_minus_infinity(device):
    """An empty group (seq_len 0, causal=False) over whole decode-sized and long tiles."""
    batch = make_batch([(3, 0), (70, 0), (2, 9)], 8, 2, 64, 16, torch.bfloat16, device=device)
    out, lse = pk.paged_attention_lse(*batch.attention_args(), 0.125, causal=False)
    assert not out[:73].any() and bool((lse[:73] == -math.inf).all())
    assert bool(torch.isfinite(lse[73:]).all())


@pytest.mark.parametrize("device", DEVICES)
def test_lse_empty_batch(device):
    batch = make_batch([], 4, 2, 64, 16, torch.float32, device=device)
    out, lse = pk.paged_attention_lse(*batch.attention_args(), 0.125, causal=False)
    assert out.shape == (0, 4, 64) and lse.shape == (0, 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype_a", FLOAT_DTYPES)
@pytest.mark.parametrize("dtype_b", FLOAT_DTYPES)
def test_merge_against_reference(device, dtype_a, dtype_b):
    g = torch.Generator().manual_seed(0)
    t, h, d = 37, 6, 72
    out_a = torch.randn(t, h, d, generator=g).to(dtype_a)
    out_b = torch.randn(t, h, d, generator=g).to(dtype_b)
    lse_a = torch.randn(t, h, generator=g) * 4
    lse_b = torch.randn(t, h, generator=g) * 4
    lse_a[0], lse_b[1] = -math.inf, -math.inf  # one side saw no key
    lse_a[2], lse_b[2] = -math.inf, -math.inf  # neither did
    lse_a[3, :3] = lse_b[3, :3] = 80.0  # equal and large: no overflow
    out, lse = pk.merge_attn_states(*(x.to(device) for x in (out_a, lse_a, out_b, lse_b)))
    ref_out, ref_lse = reference.merge_attn_states(out_a, lse_a, out_b, lse_b)
    assert out.dtype == dtype_a and lse.dtype == torch.float32
    torch.testing.assert_close(out.cpu().float(), ref_out.float(), atol=ATOL[dtype_a], rtol=0)
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=1e-5, rtol=0)
    assert not out[2].any() and bool((lse[2] == -math.inf).all())
    if dtype_a == dtype_b:  # a side that saw no key leaves the other exactly as it was
        assert torch.equal(out[0].cpu(), out_b[0]) and torch.equal(out[1].cpu(), out_a[1])


@pytest.mark.parametrize("device", DEVICES)
def test_merge_empty_and_strided(device):
    out, lse = pk.merge_attn_states(torch.zeros(0, 4, 8, device=device),
                                    torch.zeros(0, 4, device=device),
                                    torch.zeros(0, 4, 8, device=device),
                                    torch.zeros(0, 4, device=device))
    assert out.shape == (0, 4, 8) and lse.shape == (0, 4)
    base = torch.randn(5, 4, 16, device=device)
    view = base[:, :, ::2]  # non-contiguous
    lse_a, lse_b = torch.randn(5, 4, device=device), torch.randn(5, 4, device=device)
    out, _ = pk.merge_attn_states(view, lse_a, view.contiguous(), lse_b)
    torch.testing.assert_close(out, view)


def test_split_keys_merge_to_the_whole():
    """Attention over keys [0, n) equals the merge of [0, k) and [k, n): the identity the
    cascade rests on, checked with the ops alone (prefix = whole blocks)."""
    batch = make_batch([(1, 93), (6, 70)], 8, 2, 64, 16, torch.float32, seed=5)
    scale = 0.125
    whole = pk.paged_attention(*batch.attention_args(), scale)
    k = torch.tensor([32, 48], dtype=torch.int32)
    prefix_table = batch.block_table[:, :3].contiguous()
    out_p, lse_p = pk.paged_attention_lse(batch.query, batch.key_cache, batch.value_cache,
                                          prefix_table, k, batch.query_start_loc, scale,
                                          causal=False)
    suffix_table = torch.zeros_like(batch.block_table)
    suffix_table[0, :-2] = batch.block_table[0, 2:]
    suffix_table[1, :-3] = batch.block_table[1, 3:]
    out_s, lse_s = pk.paged_attention_lse(batch.query, batch.key_cache, batch.value_cache,
                                          suffix_table, batch.seq_lens - k,
                                          batch.query_start_loc, scale)
    out, _ = pk.merge_attn_states(out_p, lse_p, out_s, lse_s)
    torch.testing.assert_close(out, whole, atol=2e-6, rtol=0)


# ------------------------------------------------------------------------------------
# The cascade, planned by the StepPlanner and run by the layer's cascade_attention
# ------------------------------------------------------------------------------------

def cascade_step(groups, loners, block_size, device, pad=0, seed=0):
    """A step of prefix_group_rows planned with ALWAYS_CASCADE (and `pad` padding tokens):
    (its metadata, the cache blocks it needs)."""
    rows, used = prefix_group_rows(groups, loners, block_size, seed)
    width = max([len(ids) for ids, _, _ in rows] + [-(-pad // block_size)]) + 1
    tokens = sum(n for _, _, n in rows)
    planner = StepPlanner(block_size, max_num_seqs=len(rows) + 1,
                          max_num_tokens=max(tokens + pad, 1), max_blocks_per_seq=width,
                          device=device, cascade=ALWAYS_CASCADE)
    meta = planner.plan(rows, num_tokens=tokens + pad, num_seqs=len(rows) + (pad > 0))
    return meta, used + 2


def assert_cascade_equals_paged_attention(meta, num_blocks, num_heads, num_kv_heads,
                                          head_size, block_size, dtype, cache_dtype=None,
                                          softcap=0.0, device="cpu", seed=0):
    cache_dtype = cache_dtype or dtype
    g = torch.Generator().manual_seed(seed)
    kc = random_cache(num_blocks, block_size, num_kv_heads, head_size, cache_dtype, device, g,
                      0.37)
    vc = random_cache(num_blocks, block_size, num_kv_heads, head_size, cache_dtype, device, g,
                      1.9)
    fp8 = cache_dtype in FP8_DTYPES
    scales = (torch.tensor([0.37], device=device), torch.tensor([1.9], device=device)) \
        if fp8 else (None, None)
    q_rows = meta.query_start_loc[-1].item()
    query = torch.randn(q_rows, num_heads, head_size, generator=g).to(dtype).to(device)
    scale = 1.0 / math.sqrt(head_size)
    got = cascade_attention(query, kc, vc, meta.cascade, scale=scale, softcap=softcap,
                            k_scale=scales[0], v_scale=scales[1])
    plain = pk.paged_attention(query, kc, vc, meta.block_table, meta.seq_lens,
                               meta.query_start_loc, scale, softcap=softcap,
                               k_scale=scales[0], v_scale=scales[1])
    want = reference.paged_attention(query.cpu(), kc.cpu(), vc.cpu(), meta.block_table.cpu(),
                                     meta.seq_lens.cpu(), meta.query_start_loc.cpu(), scale,
                                     softcap=softcap, k_scale=host({"s": scales[0]})["s"],
                                     v_scale=host({"s": scales[1]})["s"])
    assert got.shape == query.shape and got.dtype == query.dtype
    torch.testing.assert_close(got.cpu().float(), want.float(), atol=ATOL[dtype], rtol=0)
    return got, plain


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_three_groups_decode_and_prefill_chunks(device, dtype):
    """Three groups (two sharing 3 and 2 blocks, one sharing 5), members decoding or
    prefilling a chunk after the prefix, loners, and padding rows."""
    groups = [(3, [(0, 1), (5, 1), (17, 1), (2, 9)]), (2, [(7, 1), (0, 4)]),
              (5, [(1, 1), (30, 1), (3, 1)])]
    loners = [(40, 1), (9, 9), (12, 0)]
    meta, nb = cascade_step(groups, loners, 16, device, pad=3)
    assert meta.cascade is not None and meta.cascade.num_groups == 3
    assert meta.cascade.shared_tokens == (48, 32, 80)
    got, plain = assert_cascade_equals_paged_attention(meta, nb, 8, 2, 128, 16, dtype,
                                                       device=device)
    # Rows outside every group merge with an empty prefix: exactly the plain result.
    members = set(meta.cascade.query_order[:meta.cascade.prefix_query_start_loc[3]].tolist())
    others = [i for i in range(got.shape[0]) if i not in members]
    assert torch.equal(got[others], plain[others])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache_dtype", FP8_DTYPES)
def test_fp8_caches_and_softcap(device, cache_dtype):
    meta, nb = cascade_step([(4, [(0, 1)] * 6), (1, [(3, 2), (0, 1)])], [(20, 1)], 8, device)
    assert meta.cascade.num_groups == 2
    assert_cascade_equals_paged_attention(meta, nb, 16, 4, 64, 8, torch.bfloat16, cache_dtype,
                                          softcap=5.0, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_window_and_alibi_layers_keep_plain_attention(device):
    """write_and_attend with a cascade plan: a sliding-window or ALiBi layer runs plain
    paged_attention (bit for bit), a plain layer the cascade."""
    meta, nb = cascade_step([(2, [(0, 1), (4, 1), (1, 3)])], [(30, 1)], 8, device)
    g = torch.Generator().manual_seed(1)
    kc = random_cache(nb, 8, 2, 64, torch.float32, device, g)
    vc = random_cache(nb, 8, 2, 64, torch.float32, device, g)
    q = torch.randn(meta.num_tokens, 4, 64, generator=g).to(device)
    nothing = torch.zeros(0, 2, 64, device=device)  # no new K/V: attention only
    meta.slot_mapping = torch.zeros(0, dtype=torch.int64, device=device)
    args = (meta.block_table, meta.seq_lens, meta.query_start_loc, 0.125)
    for kw in (dict(sliding_window=5), dict(alibi_slopes=torch.rand(4, device=device))):
        got = write_and_attend(q, nothing, nothing, (kc, vc), meta, scale=0.125, **kw)
        assert torch.equal(got, pk.paged_attention(q, kc, vc, *args, **kw))
    got = write_and_attend(q, nothing, nothing, (kc, vc), meta, scale=0.125)
    torch.testing.assert_close(got, pk.paged_attention(q, kc, vc, *args), atol=2e-5, rtol=0)


@st.composite
def cascade_cases(draw):
    block_size = draw(st.sampled_from([1, 3, 8, 16, 32]))
    groups = []
    for _ in range(draw(st.integers(0, 3))):
        shared = draw(st.integers(1, 4))
        members = [(draw(st.integers(0, 2 * block_size)), draw(st.sampled_from([0, 1, 1, 5])))
                   for _ in range(draw(st.integers(1, 6)))]
        groups.append((shared, members))
    loners = [(s, draw(st.sampled_from([0, 1, min(s, 4)])))
              for s in draw(st.lists(st.integers(1, 60), max_size=3))]
    if not any(q for _, m in groups for _, q in m) and not any(q for _, q in loners):
        loners.append((5, 1))  # at least one query row
    num_kv_heads = draw(st.sampled_from([1, 2, 3]))
    return dict(groups=groups, loners=loners, block_size=block_size,
                num_kv_heads=num_kv_heads, num_heads=num_kv_heads * draw(st.sampled_from([1, 2, 4, 5])),
                head_size=draw(st.sampled_from([8, 64, 72, 128])),
                dtype=draw(st.sampled_from(FLOAT_DTYPES)),
                fp8=draw(st.sampled_from([None, None] + FP8_DTYPES)),
                softcap=draw(st.sampled_from([0.0, 0.0, 4.0])),
                pad=draw(st.sampled_from([0, 0, 3])), seed=draw(st.integers(0, 2**16)))


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60)
@given(case=cascade_cases())
def test_hypothesis_cascade_equals_paged_attention(device, case):
    """Random batches with random prefix groups (members with no query row, groups of
    one, loners, padding): the planner's cascade equals attention over whole sequences."""
    meta, nb = cascade_step(case["groups"], case["loners"], case["block_size"], device,
                               pad=case["pad"], seed=case["seed"])
    real_groups = [g for g in case["groups"] if sum(1 for _, q in g[1] if q) >= 2]
    assert (meta.cascade is not None) == bool(real_groups)
    if meta.cascade is None:
        return
    assert meta.cascade.num_groups == len(real_groups)
    assert_cascade_equals_paged_attention(
        meta, nb, case["num_heads"], case["num_kv_heads"], case["head_size"],
        case["block_size"], case["dtype"], case["fp8"], softcap=case["softcap"], device=device,
        seed=case["seed"])
