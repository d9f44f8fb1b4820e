"""reshape_and_cache, copy_blocks and swap_blocks against the reference."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import torch_pagedkv as pk
from torch_pagedkv import reference
from conftest import DEVICES
from paged_inputs import FLOAT_DTYPES, FP8_DTYPES, random_cache


def random_write(num_tokens, num_blocks, block_size, num_kv_heads, head_size, dtype, cache_dtype,
                 device, seed=0, pad_every=0):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = max(num_blocks, -(-num_tokens // block_size))
    key = torch.randn(num_tokens, num_kv_heads, head_size, generator=gen).to(dtype).to(device)
    value = torch.randn(num_tokens, num_kv_heads, head_size, generator=gen).to(dtype).to(device)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    if pad_every:
        slots[::pad_every] = -1
    kc = random_cache(num_blocks, block_size, num_kv_heads, head_size, cache_dtype, device, gen)
    vc = random_cache(num_blocks, block_size, num_kv_heads, head_size, cache_dtype, device, gen)
    return key, value, kc, vc, slots.to(device)


def assert_same_write(key, value, kc, vc, slots, k_scale=None, v_scale=None):
    ref_k, ref_v = kc.clone().cpu(), vc.clone().cpu()
    reference.reshape_and_cache(key.cpu(), value.cpu(), ref_k, ref_v, slots.cpu(),
                                None if k_scale is None else k_scale.cpu(),
                                None if v_scale is None else v_scale.cpu())
    pk.reshape_and_cache(key, value, kc, vc, slots, k_scale, v_scale)
    # Bitwise: the kernel stores exactly what the reference stores (fp8 rounding included).
    assert torch.equal(kc.cpu().view(torch.uint8), ref_k.view(torch.uint8))
    assert torch.equal(vc.cpu().view(torch.uint8), ref_v.view(torch.uint8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("head_size,block_size", [(128, 16), (64, 8), (80, 32), (40, 1), (512, 3)])
def test_reshape_and_cache(device, dtype, head_size, block_size):
    assert_same_write(*random_write(37, 12, block_size, 2, head_size, dtype, dtype, device,
                                    pad_every=5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("cache_dtype", FP8_DTYPES)
def test_reshape_and_cache_fp8_saturates(device, dtype, cache_dtype):
    key, value, kc, vc, slots = random_write(40, 8, 16, 2, 64, dtype, cache_dtype, device)
    key[0, 0, :4] = torch.tensor([1e6, -1e6, float("inf"), float("-inf")], dtype=dtype)
    if dtype != torch.float16:
        key[1, 0, :2] = torch.tensor([1e30, float("nan")]).to(dtype)
    ks, vs = torch.tensor([0.25], device=device), torch.tensor([3.0], device=device)
    assert_same_write(key, value, kc, vc, slots, ks, vs)
    for cache in (kc, vc):
        assert torch.isfinite(cache.float()).all(), "an fp8 cache never holds inf or NaN"


@pytest.mark.parametrize("device", DEVICES)
def test_reshape_and_cache_fused_qkv_views(device):
    """K and V as views into a fused projection (token stride != heads * head_size)."""
    qkv = torch.randn(10, (8 + 2 + 2) * 64, device=device)
    key = qkv[:, 8 * 64: 10 * 64].view(10, 2, 64)
    value = qkv[:, 10 * 64:].view(10, 2, 64)
    _, _, kc, vc, slots = random_write(10, 4, 16, 2, 64, torch.float32, torch.float32, device)
    assert_same_write(key, value, kc, vc, slots)


@pytest.mark.parametrize("device", DEVICES)
def test_reshape_and_cache_empty(device):
    assert_same_write(*random_write(0, 4, 16, 2, 64, torch.float16, torch.float16, device))


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40)
@given(num_tokens=st.integers(0, 50), block_size=st.sampled_from([1, 4, 8, 16, 32, 256]),
       head_size=st.sampled_from([8, 64, 96, 128, 256]), kv_heads=st.integers(1, 4),
       dtype=st.sampled_from(FLOAT_DTYPES), fp8=st.sampled_from([None] + FP8_DTYPES),
       pad=st.sampled_from([0, 2, 3]), seed=st.integers(0, 1000))
def test_reshape_and_cache_hypothesis(device, num_tokens, block_size, head_size, kv_heads, dtype,
                                      fp8, pad, seed):
    num_blocks = -(-max(num_tokens, 1) // block_size) + 2
    write = random_write(num_tokens, num_blocks, block_size, kv_heads, head_size, dtype,
                         fp8 or dtype, device, seed, pad)
    scales = (torch.tensor([0.5], device=device), torch.tensor([2.0], device=device)) if fp8 else ()
    assert_same_write(*write, *scales)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_copy_blocks(device, cache_dtype):
    gen = torch.Generator().manual_seed(3)
    layers = [(random_cache(10, 16, 2, 64, cache_dtype, device, gen),
               random_cache(10, 16, 2, 64, cache_dtype, device, gen)) for _ in range(3)]
    mapping = torch.tensor([[0, 5], [3, 7], [3, 9], [8, 1]], device=device)
    keys, values = [k for k, _ in layers], [v for _, v in layers]
    ref_k, ref_v = [k.clone().cpu() for k in keys], [v.clone().cpu() for v in values]
    reference.copy_blocks(ref_k, ref_v, mapping.cpu())
    pk.copy_blocks(keys, values, mapping)
    for got, want in zip(keys + values, ref_k + ref_v):
        assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("device", DEVICES)
def test_copy_blocks_empty(device):
    kc = torch.randn(4, 8, 1, 8, device=device)
    before = kc.clone()
    pk.copy_blocks([kc], [kc.clone()], torch.empty(0, 2, dtype=torch.int64, device=device))
    pk.copy_blocks([], [], torch.empty(0, 2, dtype=torch.int64, device=device))
    assert torch.equal(kc, before)


@pytest.mark.parametrize("src_device,dst_device", [("cpu", "cpu")] + [
    pytest.param(a, b, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))
    for a, b in [("cuda", "cpu"), ("cpu", "cuda"), ("cuda", "cuda")]])
@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.float8_e5m2])
def test_swap_blocks(src_device, dst_device, cache_dtype):
    gen = torch.Generator().manual_seed(5)
    src = random_cache(6, 16, 2, 64, cache_dtype, src_device, gen)
    dst = random_cache(9, 16, 2, 64, cache_dtype, dst_device, gen)
    if dst_device == "cpu" and torch.cuda.is_available():
        dst = dst.pin_memory()
    mapping = torch.tensor([[0, 8], [5, 0], [2, 3]])
    want = dst.clone().cpu()
    reference.swap_blocks(src.cpu(), want, mapping)
    pk.swap_blocks(src, dst, mapping)
    assert torch.equal(dst.cpu().view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache_dtype", FP8_DTYPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_fp8_rounding_ties_and_subnormals(device, cache_dtype, dtype):
    """Every fp8 value, every midpoint between neighbours (exact ties: round to even), values
    just beside them, subnormals, saturation and NaN: stored bytes equal the reference's."""
    values = torch.arange(256, dtype=torch.uint8).view(cache_dtype).float()
    values = values[torch.isfinite(values)].unique().sort().values
    ties = (values[1:] + values[:-1]) / 2
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(4000, generator=g) * torch.exp2(torch.randint(-24, 18, (4000,), generator=g).float())
    x = torch.cat([values, ties, ties * (1 + 1e-6), ties * (1 - 1e-6), spread,
                   torch.tensor([float("inf"), -float("inf"), float("nan"), 1e30, -1e-45])])
    x = torch.cat([x, torch.zeros(-x.numel() % 64)]).view(-1, 1, 64).to(dtype).to(device)
    for scale in (1.0, 0.37):
        kc = torch.zeros(x.shape[0], 1, 1, 64, dtype=cache_dtype, device=device)
        s = torch.tensor([scale], device=device)
        assert_same_write(x, x, kc, kc.clone(), torch.arange(x.shape[0], device=device), s, s)
