"""torch.library.opcheck on every op: schema (mutations declared), fake impl, autograd
registration and AOT dispatch agree with the real kernels. fp8 caches, empty batches and
q_len-0 sequences included."""
import pytest
import torch

from conftest import DEVICES
from paged_inputs import make_batch, random_cache

OPS = torch.ops.pagedkv
# test_aot_dispatch_dynamic re-traces with dynamic shapes; all utils run by default.
UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
# test_schema compares tensors with torch.allclose, which PyTorch does not implement for
# fp8 ("mul_cpu_reduced_float" not implemented for 'Float8_e4m3fn'); the fp8 cases run the
# other utils, and the same schemas pass test_schema with the non-fp8 caches.
UTILS_FP8 = UTILS[1:]


def utils_for(*tensors):
    fp8 = any(t is not None and t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for t in tensors)
    return UTILS_FP8 if fp8 else UTILS


def attention_cases(device):
    yield "mixed", make_batch([(1, 37), (5, 5), (0, 20), (3, 40)], 8, 2, 64, 16, torch.float32, device=device), {}
    yield "fp8", make_batch([(1, 30), (4, 9)], 4, 2, 128, 16, torch.bfloat16, torch.float8_e4m3fn, device=device), {}
    yield "empty", make_batch([], 4, 2, 64, 8, torch.float16, device=device), {}
    yield "q_len_0", make_batch([(0, 12), (0, 3)], 4, 4, 64, 8, torch.float32, device=device), {}
    yield "features", make_batch([(3, 17)], 4, 1, 64, 8, torch.float32, device=device), dict(
        sliding_window=5, softcap=2.0, alibi_slopes=torch.rand(4, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_paged_attention(device):
    for name, b, kw in attention_cases(device):
        torch.library.opcheck(OPS.paged_attention.default, (*b.attention_args(), 0.125),
                              dict(kw, k_scale=b.k_scale, v_scale=b.v_scale),
                              test_utils=utils_for(b.key_cache))


@pytest.mark.parametrize("device", DEVICES)
def test_paged_attention_lse(device):
    for name, b, kw in attention_cases(device):
        torch.library.opcheck(OPS.paged_attention_lse.default, (*b.attention_args(), 0.125),
                              dict(kw, k_scale=b.k_scale, v_scale=b.v_scale),
                              test_utils=utils_for(b.key_cache))
    # causal=False: a prefix pass with more rows than keys, an empty group, q_len 0.
    for b in (make_batch([(9, 32), (4, 0), (0, 7)], 8, 2, 64, 16, torch.float32, device=device),
              make_batch([(5, 16)], 4, 2, 128, 16, torch.bfloat16, torch.float8_e5m2,
                         device=device)):
        torch.library.opcheck(OPS.paged_attention_lse.default, (*b.attention_args(), 0.125),
                              dict(k_scale=b.k_scale, v_scale=b.v_scale, causal=False),
                              test_utils=utils_for(b.key_cache))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32),
                                    (torch.bfloat16, torch.float16)])
@pytest.mark.parametrize("rows", [0, 9])
def test_merge_attn_states(device, dtypes, rows):
    g = torch.Generator().manual_seed(rows)
    lse_a, lse_b = torch.randn(rows, 4, generator=g), torch.randn(rows, 4, generator=g)
    if rows:
        lse_a[0] = lse_b[0] = -float("inf")
    args = (torch.randn(rows, 4, 64, generator=g).to(dtypes[0]).to(device), lse_a.to(device),
            torch.randn(rows, 4, 64, generator=g).to(dtypes[1]).to(device), lse_b.to(device))
    torch.library.opcheck(OPS.merge_attn_states.default, args, test_utils=UTILS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.float8_e5m2])
@pytest.mark.parametrize("num_tokens", [0, 7])
def test_reshape_and_cache(device, cache_dtype, num_tokens):
    g = torch.Generator().manual_seed(0)
    kc = random_cache(4, 8, 2, 64, cache_dtype, device, g)
    vc = random_cache(4, 8, 2, 64, cache_dtype, device, g)
    key = torch.randn(num_tokens, 2, 64, generator=g).half().to(device)
    value = torch.randn(num_tokens, 2, 64, generator=g).half().to(device)
    slots = torch.randperm(32, generator=g)[:num_tokens].to(device)
    scales = dict(k_scale=torch.tensor([0.5], device=device), v_scale=torch.tensor([2.0], device=device))
    torch.library.opcheck(OPS.reshape_and_cache.default, (key, value, kc, vc, slots), scales,
                          test_utils=utils_for(kc))


@pytest.mark.parametrize("device", DEVICES)
def test_copy_and_swap_blocks(device):
    g = torch.Generator().manual_seed(1)
    caches = [random_cache(6, 8, 2, 64, torch.float32, device, g) for _ in range(4)]
    for mapping in (torch.tensor([[0, 3], [1, 5]], device=device),
                    torch.empty(0, 2, dtype=torch.int64, device=device)):
        torch.library.opcheck(OPS.copy_blocks.default, (caches[:2], caches[2:], mapping),
                              test_utils=UTILS)
    torch.library.opcheck(OPS.swap_blocks.default,
                          (caches[0], caches[1], torch.tensor([[0, 3], [2, 1]])), test_utils=UTILS)
