"""A wide random sweep of paged_attention against the float64-accumulating reference:
every query and cache dtype (fp8 included), head sizes 8-512, block sizes 1-256, GQA
ratios, sliding windows, softcap and ALiBi, decode and prefill rows mixed, batches both
small (run on the calling thread) and large enough for the threaded path.

The same cases also run through the CUDA kernels on the SIMT emulator (with the attention
path and the split-K cap drawn too). CI runs a small slice; the full sweeps are one command:

    PAGEDKV_SWEEP_EXAMPLES=2000 PAGEDKV_SIMT_SWEEP_EXAMPLES=300 \
        python -m pytest -q tests/test_attention_sweep.py
"""
import os

import pytest
from hypothesis import given, settings, strategies as st

from conftest import DEVICES
from cuda_backends import emulation
from torch_pagedkv import knobs
from paged_inputs import FLOAT_DTYPES, FP8_DTYPES
from test_paged_attention import check_case

EXAMPLES = int(os.environ.get("PAGEDKV_SWEEP_EXAMPLES", "25"))
SIMT_EXAMPLES = int(os.environ.get("PAGEDKV_SIMT_SWEEP_EXAMPLES", "12"))
HEAD_SIZES = [8, 16, 24, 40, 64, 72, 80, 96, 112, 128, 160, 192, 256, 320, 512]
BLOCK_SIZES = [1, 2, 3, 5, 8, 15, 16, 17, 32, 64, 128, 256]


@st.composite
def sweep_cases(draw):
    num_kv_heads = draw(st.sampled_from([1, 2, 4, 8]))
    group = draw(st.sampled_from([1, 2, 3, 4, 8]))
    head_size = draw(st.sampled_from(HEAD_SIZES))
    # Long contexts only with small heads: the reference is slow.
    max_len = 700 if head_size <= 128 else 200
    seqs = []
    for _ in range(draw(st.integers(1, 6))):
        seq_len = draw(st.integers(1, max_len))
        q_len = draw(st.sampled_from([1, 1, 0, seq_len, min(seq_len, 9), min(seq_len, 33)]))
        seqs.append((q_len, seq_len))
    return dict(
        seqs=seqs, num_heads=num_kv_heads * group, num_kv_heads=num_kv_heads,
        head_size=head_size, block_size=draw(st.sampled_from(BLOCK_SIZES)),
        dtype=draw(st.sampled_from(FLOAT_DTYPES)),
        fp8=draw(st.sampled_from([None, None] + FP8_DTYPES)),
        window=draw(st.sampled_from([-1, -1, -1, 1, 7, 100])),
        softcap=draw(st.sampled_from([0.0, 0.0, 5.0])),
        alibi=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=EXAMPLES)
@given(case=sweep_cases())
def test_sweep_against_reference(device, case):
    check_case(device, case)


@pytest.mark.skipif(emulation is None, reason="the SIMT emulator is not built")
@settings(max_examples=SIMT_EXAMPLES)
@given(case=sweep_cases(), path=st.sampled_from(["auto", "decode", "prefill"]),
       splits=st.sampled_from(["auto", "1", "2", "3", "16"]),
       order=st.sampled_from(["random", "forward", "reverse"]))
def test_sweep_emulated_cuda_kernels(case, path, splits, order):
    with knobs.override(attention_path=path, decode_splits=splits), \
            emulation.settings(order=order, seed=case["seed"]):
        check_case("cpu", case, ops=emulation)
