"""KVCache: per-layer caches as in docs/design.md §2, sized by blocks or bytes, any dtype."""
import pytest
import torch

from conftest import DEVICES
from torch_pagedkv import ops, reference
from torch_pagedkv.cache.kv_cache import KVCache

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
              torch.float8_e5m2]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_layout_per_layer_contiguous_nhd(dtype, device):
    kv = KVCache(3, 2, 64, 16, num_blocks=10, dtype=dtype, device=device)
    assert len(kv.key_caches) == len(kv.value_caches) == 3
    for k, v in kv.kv_caches:
        for t in (k, v):
            assert t.shape == (10, 16, 2, 64) and t.dtype == dtype and t.is_contiguous()
            assert t.device.type == torch.device(device).type
        assert k.data_ptr() != v.data_ptr()
    ptrs = {t.data_ptr() for t in kv.key_caches + kv.value_caches}
    assert len(ptrs) == 6  # separate tensors: no two layers alias


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_memory_budget_gives_the_largest_block_count_that_fits(dtype):
    per_block = KVCache.bytes_per_block(4, 2, 64, 16, dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    assert per_block == 2 * 4 * 16 * 2 * 64 * elem
    kv = KVCache(4, 2, 64, 16, memory_bytes=7 * per_block + per_block - 1, dtype=dtype)
    assert kv.num_blocks == 7
    assert kv.nbytes == 7 * per_block <= 8 * per_block - 1
    assert kv.block_bytes == per_block


def test_bad_sizes_are_rejected_with_a_reason():
    with pytest.raises(ValueError, match="exactly one"):
        KVCache(1, 1, 8, 16)
    with pytest.raises(ValueError, match="exactly one"):
        KVCache(1, 1, 8, 16, num_blocks=2, memory_bytes=1 << 20)
    with pytest.raises(ValueError, match="holds no block"):
        KVCache(1, 1, 8, 16, memory_bytes=100)
    with pytest.raises(ValueError, match="dtype"):
        KVCache(1, 1, 8, 16, num_blocks=2, dtype=torch.int8)
    with pytest.raises(ValueError, match="one value per layer"):
        KVCache(2, 1, 8, 16, num_blocks=2, dtype=torch.float8_e4m3fn, k_scales=[1.0])


def test_fp8_scales_are_per_layer_float32_tensors_the_ops_use():
    kv = KVCache(2, 1, 8, 4, num_blocks=2, dtype=torch.float8_e4m3fn, k_scales=[0.5, 2.0],
                 v_scales=[1.0, 4.0])
    assert kv.is_fp8
    for k_s, v_s in kv.kv_scales:
        assert k_s.dtype == v_s.dtype == torch.float32 and k_s.numel() == v_s.numel() == 1
    assert [s.item() for s in kv.k_scales] == [0.5, 2.0]
    key = torch.full((1, 1, 8), 3.0)
    value = torch.full((1, 1, 8), 3.0)
    kc, vc = kv.layer(1)
    ops.reshape_and_cache(key, value, kc, vc, torch.tensor([5]), *kv.kv_scales[1])
    assert kc[1, 1].float().tolist() == [[1.5] * 8]  # stored x / 2.0
    assert vc[1, 1].float().tolist() == [[0.75] * 8]  # stored x / 4.0
    kv.set_scales(1, 3.0, 3.0)  # in place: the same tensors (a compiled graph sees it)
    assert kv.k_scales[1].item() == 3.0 and kv.kv_scales[1][0] is kv.k_scales[1]


def test_caches_start_zeroed_not_garbage():
    kv = KVCache(1, 2, 16, 8, num_blocks=4, dtype=torch.float16)
    assert all(t.abs().sum().item() == 0 for t in kv.key_caches + kv.value_caches)


@pytest.mark.parametrize("device", DEVICES)
def test_copy_blocks_copies_every_layer(device):
    torch.manual_seed(0)
    kv = KVCache(3, 2, 16, 4, num_blocks=6, dtype=torch.float32, device=device)
    for t in kv.key_caches + kv.value_caches:
        t.copy_(torch.randn(t.shape))
    expected_k = [t.clone() for t in kv.key_caches]
    expected_v = [t.clone() for t in kv.value_caches]
    reference.copy_blocks(expected_k, expected_v, torch.tensor([[0, 3], [2, 5]]))
    kv.copy_blocks([(0, 3), (2, 5)])
    kv.copy_blocks([])  # nothing to do
    for got, want in zip(kv.key_caches + kv.value_caches, expected_k + expected_v):
        assert torch.equal(got, want)
