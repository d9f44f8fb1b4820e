"""The split-K decode kernel's grid and scratch (csrc/cuda/launch_config.cpp decode_plan,
through the private op pagedkv::_decode_plan, the same function and knob every launch
uses): the
scratch is bounded by the device and the batch, never by the block table's width; the
splits fill the device, never exceed the table's partitions or the grid's z limit, and
honour the decode_splits knob; mixed batches put one CTA row per sequence. Runs without a
GPU (the op takes no tensors) wherever the CUDA kernels are built."""
import pytest
from hypothesis import given, settings, strategies as st

import torch
import torch_pagedkv as pk

pytestmark = pytest.mark.skipif(not pk.HAS_CUDA_KERNELS, reason="built without CUDA kernels")

SCRATCH_BUDGET = 64 << 20  # kernels.h kDecodeScratchBytes
CTAS_PER_SM = 16           # kernels.h kDecodeCtasPerSm
H100_SMS = 132


def plan(T, S, H, KVH, D, block_size, columns, P=512, sms=H100_SMS, mixed=False):
    rows, splits, scratch = torch.ops.pagedkv._decode_plan(T, S, H, KVH, D, block_size, columns,
                                                           P, sms, mixed)
    return rows, splits, scratch


def test_the_issue_case_is_bounded():
    """T=256, H=64 over a 128k-token table: 2.2 GB of scratch per call before."""
    before = 256 * 64 * (131072 // 512) * (128 + 2) * 4
    assert before > 2 << 30
    rows, splits, scratch = plan(256, 256, 64, 8, 128, 16, 131072 // 16)
    assert rows == 256 and 1 < splits < 131072 // 512
    assert scratch == 256 * 64 * splits * 130 * 4 <= SCRATCH_BUDGET


def test_batch_one_long_context_uses_every_partition():
    """One decode row: as many splits as the table has partitions (the device is far from
    full), a few MB of scratch."""
    rows, splits, scratch = plan(1, 1, 32, 8, 128, 16, 131072 // 16)
    assert (rows, splits) == (1, 256)
    assert scratch == 256 * 32 * 130 * 4


def test_one_partition_needs_no_scratch_and_an_empty_batch_none_at_all():
    assert plan(64, 64, 32, 8, 128, 16, 512 // 16) == (64, 1, 0)
    assert plan(0, 0, 32, 8, 128, 16, 100) == (0, 1, 0)


def test_a_full_device_gets_one_split():
    """When the rows alone give every SM its CTAs, each CTA walks its whole row: no
    scratch, no reduce kernel."""
    T = CTAS_PER_SM * H100_SMS  # x 8 kv heads: 8x the target
    rows, splits, scratch = plan(T, T, 64, 8, 128, 16, 8192)
    assert splits == max(1, SCRATCH_BUDGET // (T * 64 * 130 * 4))


def test_mixed_batches_have_a_row_per_sequence():
    rows, splits, _ = plan(8192, 24, 32, 8, 128, 16, 4096, mixed=True)
    assert rows == 24 and splits > 1


@pytest.mark.parametrize("cap", [1, 2, 3, 16])
def test_the_knob_caps_the_splits(cap):
    from torch_pagedkv import knobs
    with knobs.override(decode_splits=str(cap)):
        assert plan(1, 1, 32, 8, 128, 16, 8192)[1] == cap
        assert plan(1, 1, 32, 8, 128, 16, 2)[1] == 1  # one partition: one split
    assert plan(1, 1, 32, 8, 128, 16, 8192)[1] == 256


@settings(max_examples=300, deadline=None)
@given(T=st.integers(0, 4096), kv=st.sampled_from([1, 2, 4, 8, 16]),
       group=st.sampled_from([1, 2, 4, 6, 8, 12, 16]), D=st.sampled_from([8, 64, 128, 256, 512]),
       block_size=st.sampled_from([1, 16, 256]), columns=st.integers(1, 1 << 17),
       P=st.sampled_from([64, 512, 1024]), sms=st.sampled_from([1, 78, 132, 144]),
       mixed=st.booleans())
def test_bounds_over_random_shapes(T, kv, group, D, block_size, columns, P, sms, mixed):
    H = kv * group
    S = max(1, T // 3) if mixed else T
    rows, splits, scratch = plan(T, S, H, kv, D, block_size, columns, P, sms, mixed)
    parts = max(1, -(-(columns * block_size) // P))
    assert rows == (S if mixed else T)
    assert 1 <= splits <= min(parts, 65535)
    hp = -(-group // -(-group // 8))  # heads per CTA (kernels.h heads_per_cta)
    fill_bound = 2 * CTAS_PER_SM * sms * hp * (D + 2) * 4
    assert scratch <= max(SCRATCH_BUDGET, fill_bound)
    assert scratch == (0 if splits == 1 else rows * H * splits * (D + 2) * 4)
    # Widening the table never grows the scratch past the bound either.
    wide = plan(T, S, H, kv, D, block_size, 1 << 20 // block_size, P, sms, mixed)[2]
    assert wide <= max(SCRATCH_BUDGET, fill_bound)
