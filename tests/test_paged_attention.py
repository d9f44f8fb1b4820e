"""paged_attention against the reference: every dtype, fp8 caches, head and block sizes,
GQA ratios, features and mixed batches (decode, prefill, prefix + chunk, q_len 0)."""
import math
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

import torch_pagedkv as pk
from torch_pagedkv import knobs, reference
from conftest import DEVICES
from paged_inputs import ATOL, FLOAT_DTYPES, FP8_DTYPES, make_batch

MIXED = [(1, 37), (5, 5), (0, 20), (3, 100), (17, 50), (1, 1)]


def check(batch, dtype, atol=None, ops=pk, **kw):
    scale = 1.0 / math.sqrt(batch.query.shape[-1])
    args = batch.attention_args()
    kw.setdefault("k_scale", batch.k_scale)
    kw.setdefault("v_scale", batch.v_scale)
    out = ops.paged_attention(*args, scale, **kw)
    ref = reference.paged_attention(*[a.cpu() if torch.is_tensor(a) else a for a in args], scale,
                                    **{k: (v.cpu() if torch.is_tensor(v) else v)
                                       for k, v in kw.items()})
    assert out.shape == batch.query.shape and out.dtype == batch.query.dtype
    torch.testing.assert_close(out.cpu().float(), ref.float(), atol=atol or ATOL[dtype], rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("head_size", [64, 80, 96, 112, 128, 192, 256, 40])
@pytest.mark.parametrize("block_size", [8, 16, 32, 5])
def test_specialized_and_generic_shapes(device, dtype, head_size, block_size):
    batch = make_batch(MIXED, 8, 2, head_size, block_size, dtype, device=device,
                       seed=head_size * 1000 + block_size)
    check(batch, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("cache_dtype", FP8_DTYPES)
@pytest.mark.parametrize("head_size,block_size", [(128, 16), (64, 8), (24, 3)])
def test_fp8_cache(device, dtype, cache_dtype, head_size, block_size):
    batch = make_batch(MIXED, 8, 4, head_size, block_size, dtype, cache_dtype, device=device)
    check(batch, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (8, 2), (32, 8), (16, 1), (6, 3)])
def test_gqa_ratios(device, num_heads, num_kv_heads):
    check(make_batch(MIXED, num_heads, num_kv_heads, 64, 16, torch.float32, device=device),
          torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("feature", [
    dict(sliding_window=7), dict(sliding_window=1), dict(sliding_window=64), dict(softcap=3.0),
    dict(alibi_slopes="random"), dict(sliding_window=9, softcap=2.0, alibi_slopes="random"),
])
def test_features(device, dtype, feature):
    batch = make_batch(MIXED, 8, 2, 64, 16, dtype, device=device, seed=7)
    kw = dict(feature)
    if kw.get("alibi_slopes") == "random":
        kw["alibi_slopes"] = torch.rand(8, generator=torch.Generator().manual_seed(1)).to(device)
    check(batch, dtype, **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_batch_kinds(device):
    for seqs in ([(1, 2048)] * 3, [(300, 300)], [(64, 1000)], [(0, 5), (0, 9)], [(1, 1)]):
        check(make_batch(seqs, 8, 2, 64, 16, torch.float32, device=device), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    batch = make_batch([], 4, 2, 64, 16, torch.float32, device=device)
    out = pk.paged_attention(*batch.attention_args(), 0.125)
    assert out.shape == (0, 4, 64)


@pytest.mark.parametrize("device", DEVICES)
def test_query_views(device):
    """A query that is a strided view (a slice of a fused QKV projection) reads correctly."""
    batch = make_batch(MIXED, 8, 2, 64, 16, torch.float32, device=device)
    fused = torch.randn(batch.query.shape[0], 12 * 64, device=device)
    batch.query = fused[:, : 8 * 64].view(-1, 8, 64)
    check(batch, torch.float32)


def test_generic_kernel_matches_specialized():
    batch = make_batch(MIXED, 8, 2, 128, 16, torch.bfloat16)
    special = pk.paged_attention(*batch.attention_args(), 0.1)
    with knobs.override(generic_kernels=True):
        generic = pk.paged_attention(*batch.attention_args(), 0.1)
    torch.testing.assert_close(special.float(), generic.float(), atol=1e-2, rtol=0)


@st.composite
def attention_cases(draw):
    num_kv_heads = draw(st.sampled_from([1, 2, 3]))
    group = draw(st.sampled_from([1, 2, 4, 5]))
    seqs = []
    for _ in range(draw(st.integers(0, 4))):
        seq_len = draw(st.integers(1, 80))
        seqs.append((draw(st.sampled_from([0, 1, seq_len, min(seq_len, 7)])), seq_len))
    return dict(
        seqs=seqs, num_heads=num_kv_heads * group, num_kv_heads=num_kv_heads,
        head_size=draw(st.sampled_from([8, 16, 64, 72, 128, 256])),
        block_size=draw(st.sampled_from([1, 2, 7, 8, 16, 32, 33])),
        dtype=draw(st.sampled_from(FLOAT_DTYPES)),
        fp8=draw(st.sampled_from([None] + FP8_DTYPES)),
        window=draw(st.sampled_from([-1, -1, 1, 5, 40])),
        softcap=draw(st.sampled_from([0.0, 0.0, 4.0])),
        alibi=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def check_case(device, case, ops=pk):
    """One drawn case (attention_cases' keys) against the reference, through `ops`
    (torch_pagedkv, or torch_pagedkv.emulation for the emulated CUDA kernels)."""
    batch = make_batch(case["seqs"], case["num_heads"], case["num_kv_heads"], case["head_size"],
                       case["block_size"], case["dtype"], case["fp8"], device=device,
                       seed=case["seed"])
    alibi = (torch.rand(case["num_heads"], generator=torch.Generator().manual_seed(case["seed"]))
             .to(device) if case["alibi"] else None)
    check(batch, case["dtype"], ops=ops, sliding_window=case["window"], softcap=case["softcap"],
          alibi_slopes=alibi)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60)
@given(case=attention_cases())
def test_hypothesis_against_reference(device, case):
    check_case(device, case)


# Causal prefill without a sliding window runs on the matrix-style tiles (attention_prefix.h:
# up to 256 query vectors per kv head, 64-key chunks, the diagonal chunks masked per row).
# Rows that start and end mid-chunk, a cached prefix (chunked prefill), blocks that do not
# divide the chunk, GQA groups 1-8, softcap and ALiBi, every cache dtype; with a window the
# same shapes stay on the decode-style tiles (the control).
@pytest.mark.parametrize("group,head_size,block_size", [(4, 64, 16), (1, 40, 5), (8, 72, 32),
                                                        (3, 128, 17)])
@pytest.mark.parametrize("dtype,fp8", [(torch.float32, None), (torch.bfloat16, None),
                                       (torch.float16, None), (torch.bfloat16, torch.float8_e4m3fn)])
@pytest.mark.parametrize("window", [-1, 50])
def test_causal_prefill_tall_tiles(group, head_size, block_size, dtype, fp8, window):
    case = dict(seqs=[(300, 300), (129, 400), (70, 71), (1, 90)], num_heads=2 * group,
                num_kv_heads=2, head_size=head_size, block_size=block_size, dtype=dtype,
                fp8=fp8, window=window, softcap=5.0 if group == 4 else 0.0,
                alibi=group == 8, seed=group * 7 + block_size)
    check_case("cpu", case)
