"""CUDA kernels against the reference, beyond the device-parametrized op tests
(test_paged_attention.py, test_cascade.py, test_cache_writes.py, test_opcheck.py run on
CUDA too): lse from both attention kernels and the split-K reduce, the merge kernel for
every dtype pair, cascade attention replayed in a CUDA graph; both
attention kernels (split-K decode and tiled prefill) on the same inputs, partition edges
of the split-K decode, every launch config giving the same results, generic vs
specialized kernels, out-of-range metadata never faulting, debug-mode range checks, the
vectorized and scalar write paths, copy_blocks across many layers and swap_blocks with
the mapping on either side. Each runs on a GPU ("cuda", skipped without one) and on the
SIMT emulator ("simt": the same kernels and glue on the CPU, tests/cuda_backends.py),
except where a case needs what only a GPU has (host memory apart from the device's,
CUDA graphs, the caching allocator's statistics, 34 GB caches).""" 
import math
import os
import subprocess
import sys

import pytest
import torch

import torch_pagedkv as pk
from torch_pagedkv import knobs, reference
from torch_pagedkv.tuning import table
from torch_pagedkv.tuning.table import Entry, LaunchConfig
from cuda_backends import BACKENDS, ops_of
from paged_inputs import ATOL, FLOAT_DTYPES, FP8_DTYPES, make_batch, random_cache

# Direct parametrization over be=GPU alone, for the cases only a GPU can run.
CUDA_ONLY = pytest.mark.parametrize("be", [BACKENDS[0]])


@pytest.fixture(params=BACKENDS)
def be(request):
    return request.param


PATHS = ["decode", "prefill"]


def dtype_id(d) -> str:
    return "same" if d is None else str(d).removeprefix("torch.")
MIXED = [(1, 37), (5, 5), (0, 20), (3, 100), (17, 50), (1, 1)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_kernels_are_built():
    assert pk.HAS_CUDA_KERNELS, "a GPU is present but torch_pagedkv was built without CUDA kernels"


@pytest.fixture
def configs(be):
    """Sets launch configs for this GPU; restores the installed table afterwards."""
    gpu = be.gpu_name()

    def use(head_size, cache_dtype, block_size, **changes):
        name = str(cache_dtype).removeprefix("torch.")
        base = table.heuristic(head_size, name, block_size, be.ns)
        cfg = LaunchConfig(**{**base.__dict__, **changes})
        table.apply([Entry(gpu, head_size, name, block_size, cfg)], be.ns)
    yield use
    be.ns._clear_launch_configs()
    table.install(be.ns)


def attend(batch, path=None, **kw):
    scale = 1.0 / math.sqrt(batch.query.shape[-1])
    kw.setdefault("k_scale", batch.k_scale)
    kw.setdefault("v_scale", batch.v_scale)
    forced = {} if path is None else {"attention_path": path}
    with knobs.override(**forced):
        return ops_of(batch.query).paged_attention(*batch.attention_args(), scale, **kw)


def expected(batch, **kw):
    scale = 1.0 / math.sqrt(batch.query.shape[-1])
    kw.setdefault("k_scale", batch.k_scale)
    kw.setdefault("v_scale", batch.v_scale)
    cpu = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()}
    return reference.paged_attention(*[a.cpu() for a in batch.attention_args()], scale, **cpu)


def assert_matches(out, ref, dtype, atol=None):
    torch.testing.assert_close(out.cpu().float(), ref.float(), atol=atol or ATOL[dtype], rtol=0)


@pytest.mark.simt_sample(8)
# ------------------------------------------------------------------------------------
# paged_attention
# ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_size", [64, 80, 96, 112, 128, 192, 256, 8, 40, 136, 512])
@pytest.mark.parametrize("block_size", [8, 16, 32, 1, 12])
def test_both_kernels_every_shape(be, path, dtype, head_size, block_size):
    batch = make_batch(MIXED, 8, 2, head_size, block_size, dtype, device=be.device,
                       seed=head_size + block_size)
    assert_matches(attend(batch, path), expected(batch), dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                               (torch.float16, torch.float8_e5m2)],
                         ids=["fp32", "bf16", "f16-e5m2"])
@pytest.mark.parametrize("block_size", [128, 256])
def test_large_blocks(be, path, dtype, cache_dtype, block_size):
    """vLLM's CPU default of 128-token blocks and the largest size the ops take: a
    partition of the split-K decode is then shorter than a block, a prefill key tile lies
    inside one block."""
    batch = make_batch([(1, 700), (9, 300), (1, 129), (0, 4)], 8, 2, 64, block_size, dtype,
                       cache_dtype, device=be.device, seed=block_size)
    assert_matches(attend(batch, path), expected(batch), dtype)


@pytest.mark.simt_sample(4)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("cache_dtype", FP8_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_size,block_size", [(128, 16), (64, 8), (256, 32), (24, 3)])
def test_fp8_caches(be, path, dtype, cache_dtype, head_size, block_size):
    batch = make_batch(MIXED, 8, 4, head_size, block_size, dtype, cache_dtype, device=be.device)
    assert_matches(attend(batch, path), expected(batch), dtype)


@pytest.mark.simt_sample(2)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("num_heads,num_kv_heads", [
    (8, 8), (8, 4), (8, 2), (32, 8), (6, 2), (7, 1), (8, 1), (12, 1), (16, 1), (32, 1), (18, 2)])
def test_gqa_groups_including_chunked(be, path, num_heads, num_kv_heads):
    """Groups up to 8 heads share one CTA; larger ones (12, 16, 32) split into chunks."""
    batch = make_batch(MIXED, num_heads, num_kv_heads, 128, 16, torch.float16, device=be.device)
    assert_matches(attend(batch, path), expected(batch), torch.float16)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("feature", [
    dict(sliding_window=1), dict(sliding_window=7), dict(sliding_window=600),
    dict(softcap=3.0), dict(alibi_slopes=True),
    dict(sliding_window=100, softcap=2.0, alibi_slopes=True)])
def test_features(be, path, feature):
    batch = make_batch([(1, 1500), (1, 700), (40, 900), (0, 3), (9, 9)], 16, 4, 128, 16,
                       torch.bfloat16, device=be.device, seed=3)
    kw = dict(feature)
    if kw.pop("alibi_slopes", False):
        kw["alibi_slopes"] = torch.rand(16, generator=torch.Generator().manual_seed(2)).to(be.device)
    assert_matches(attend(batch, path, **kw), expected(batch, **kw), torch.bfloat16)


@pytest.mark.simt_sample(2)
@pytest.mark.parametrize("partition_size", [64, 128, 512, 1024])
@pytest.mark.parametrize("window", [-1, 65, 200])
def test_decode_partition_edges(be, configs, partition_size, window):
    """Context lengths on and around partition boundaries, one or many partitions per row,
    windows that start the visible keys past the first partition."""
    P = partition_size
    lens = [1, P - 1, P, P + 1, 2 * P - 1, 2 * P, 3 * P + 5, 1000]
    configs(64, torch.float32, 16, partition_size=P)
    batch = make_batch([(1, n) for n in lens], 4, 2, 64, 16, torch.float32, device=be.device,
                       columns=-(-max(lens) // 16) + 3)
    out = attend(batch, "decode", sliding_window=window)
    assert_matches(out, expected(batch, sliding_window=window), torch.float32)


@pytest.mark.simt_sample(2)
@pytest.mark.parametrize("splits", ["1", "2", "3", "16"])
@pytest.mark.parametrize("partition_size", [64, 256])
@pytest.mark.parametrize("window", [-1, 150])
def test_decode_splits_walking_many_partitions(be, configs, splits, partition_size, window):
    """With few splits, each split-K CTA walks several partitions (first + s, first + s +
    splits, ...), carrying a running max and sum across them: rows of 1 to ~12
    partitions, windows starting mid-row, fp32 against the reference."""
    P = partition_size
    lens = [1, P - 1, P + 1, 2 * P, 3 * P + 5, 7 * P + 3, 12 * P - 1, 40]
    configs(64, torch.float32, 16, partition_size=P)
    batch = make_batch([(1, n) for n in lens], 8, 2, 64, 16, torch.float32, device=be.device,
                       columns=-(-max(lens) // 16) + 3, seed=int(splits))
    with knobs.override(decode_splits=splits):
        out = attend(batch, "decode", sliding_window=window)
        lse_out, lse = attend_lse(batch, "decode", True, sliding_window=window)
    assert_matches(out, expected(batch, sliding_window=window), torch.float32)
    assert_lse_matches(batch, lse_out, lse, torch.float32, True, sliding_window=window)


@pytest.mark.simt_sample(2)
@pytest.mark.parametrize("splits", ["auto", "2"])
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.bfloat16, None), (torch.float32, None),
                                               (torch.float16, torch.float8_e4m3fn)],
                         ids=["bf16", "fp32", "f16-fp8"])
def test_mixed_batches_send_decode_rows_to_split_k(be, configs, splits, dtype, cache_dtype):
    """A chunked-prefill batch (more query rows than sequences): sequences with one query
    row go to the split-K decode kernel, the others to the prefill kernel, in one call;
    long decode rows (up to ~70 partitions of 64 keys) next to prefill chunks, an empty
    sequence, a one-token sequence; the result equals the reference and both forced
    kernels."""
    configs(128, cache_dtype or dtype, 16, partition_size=64)
    seqs = [(1, 4500), (37, 600), (1, 1), (0, 5), (1, 3000), (130, 130), (1, 65), (2, 900)]
    batch = make_batch(seqs, 16, 4, 128, 16, dtype, cache_dtype, device=be.device, seed=7)
    ref = expected(batch)
    with knobs.override(decode_splits=splits):
        out = attend(batch)
        assert_matches(out, ref, dtype)
        for causal in (True, False):
            lse_out, lse = attend_lse(batch, "auto", causal)
            assert_lse_matches(batch, lse_out, lse, dtype, causal)
    for path in PATHS:
        assert_matches(attend(batch, path), ref, dtype)


@pytest.mark.parametrize("feature", [dict(sliding_window=100), dict(softcap=3.0),
                                     dict(alibi_slopes=True)])
def test_mixed_batch_features(be, feature):
    batch = make_batch([(1, 2500), (40, 900), (1, 3), (9, 9), (1, 1100)], 16, 4, 128, 16,
                       torch.bfloat16, device=be.device, seed=5)
    kw = dict(feature)
    if kw.pop("alibi_slopes", False):
        kw["alibi_slopes"] = torch.rand(16, generator=torch.Generator().manual_seed(2)).to(be.device)
    assert_matches(attend(batch, **kw), expected(batch, **kw), torch.bfloat16)


@CUDA_ONLY
def test_decode_scratch_does_not_grow_with_the_table_width(be):
    """The split-K scratch is sized by decode_plan (device and batch), not by the block
    table's width: 64 decode rows x 32 heads over a 128k-token-wide table used to take
    64 x 32 x 256 partitions x 130 floats = 272 MB per call."""
    batch = make_batch([(1, 40 + 37 * i) for i in range(64)], 32, 8, 128, 16, torch.bfloat16,
                       device=be.device, columns=8192, seed=4)
    ref = expected(batch)
    attend(batch)  # warm-up: the caching allocator and the launch-config table
    be.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = attend(batch)
    be.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= (64 << 20) + 2 * out.numel() * out.element_size(), extra
    assert_matches(out, ref, torch.bfloat16)


@pytest.mark.simt_sample(6)
@pytest.mark.parametrize("decode_threads", [64, 128, 256])
@pytest.mark.parametrize("partition_size", [64, 256, 512, 1024])
@pytest.mark.parametrize("prefill_threads", [64, 128, 256])
def test_every_launch_config_gives_the_same_result(be, configs, decode_threads,
                                                   partition_size, prefill_threads):
    configs(128, torch.bfloat16, 16, decode_threads=decode_threads,
            partition_size=partition_size, prefill_threads=prefill_threads)
    batch = make_batch([(1, 2000), (1, 33), (6, 700), (1, 1)], 32, 8, 128, 16, torch.bfloat16,
                       device=be.device, seed=11)
    ref = expected(batch)
    for path in PATHS:
        assert_matches(attend(batch, path), ref, torch.bfloat16)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=dtype_id)
def test_generic_kernel_matches_specialized(be, path, cache_dtype):
    batch = make_batch(MIXED + [(1, 1200)], 32, 8, 128, 16, torch.bfloat16, cache_dtype,
                       device=be.device)
    special = attend(batch, path)
    with knobs.override(generic_kernels=True):
        generic = attend(batch, path)
    torch.testing.assert_close(special.float(), generic.float(), atol=1.6e-2, rtol=0)
    assert_matches(generic, expected(batch), torch.bfloat16)


@pytest.mark.parametrize("path", PATHS)
def test_batch_kinds(be, path):
    for seqs in ([(1, 4100)] * 3, [(300, 300)], [(64, 1000)], [(0, 5), (0, 9)], [(1, 1)],
                 [(2, 40), (0, 3), (1, 1)], [(1, 17)] * 70):
        batch = make_batch(seqs, 8, 2, 64, 16, torch.float32, device=be.device)
        assert_matches(attend(batch, path), expected(batch), torch.float32)


def test_strided_metadata_views(be):
    """Metadata that are views with non-unit strides read the same as contiguous copies."""
    batch = make_batch([(1, 90), (4, 30), (1, 5)], 8, 2, 64, 8, torch.float16, device=be.device)
    ref = expected(batch)
    wide = torch.zeros(batch.block_table.shape[0], 2 * batch.block_table.shape[1],
                       dtype=torch.int32, device=be.device)
    wide[:, ::2] = batch.block_table
    batch.block_table = wide[:, ::2]  # column stride 2
    lens = torch.zeros(6, dtype=torch.int32, device=be.device)
    lens[::2] = batch.seq_lens
    batch.seq_lens = lens[::2]
    assert_matches(attend(batch), ref, torch.float16)


@pytest.mark.parametrize("path", PATHS)
def test_out_of_range_block_ids_never_fault(be, path):
    """Bad ids inside the visible range are skipped on the device (no fault, finite output);
    the stream stays usable."""
    batch = make_batch([(1, 300), (3, 50), (1, 2000)], 8, 2, 64, 16, torch.float16, device=be.device)
    nb = batch.key_cache.shape[0]
    batch.block_table[0, 2] = nb
    batch.block_table[1, 0] = -5
    batch.block_table[2, 7] = 2**31 - 1
    out = attend(batch, path)
    be.synchronize()
    assert torch.isfinite(out.float()).all()
    # Rows whose keys are all readable are unaffected.
    good = make_batch([(1, 300)], 8, 2, 64, 16, torch.float16, device=be.device)
    assert_matches(attend(good), expected(good), torch.float16)


@pytest.mark.parametrize("path", PATHS)
def test_malformed_lengths_never_fault(be, path):
    """seq_lens beyond the table or negative, query_start_loc out of order or past the
    rows: no fault (compute-sanitizer in scripts/gpu_check.sh checks no access is out of
    bounds)."""
    batch = make_batch([(1, 40), (2, 20), (1, 9)], 4, 2, 64, 16, torch.float32, device=be.device)
    batch.seq_lens[0] = 10**9
    batch.seq_lens[1] = -7
    for qsl in ([0, 1, 3, 4], [0, 3, 1, 4], [0, 1, 99, 4], [-3, 1, 3, 4]):
        batch.query_start_loc.copy_(torch.tensor(qsl, dtype=torch.int32))
        attend(batch, path)
    be.synchronize()


DEBUG_SCRIPT = r"""
import torch
import PK as pk
kc = torch.randn(4, 16, 2, 64, device=DEV); vc = torch.randn_like(kc)
k = torch.randn(3, 2, 64, device=DEV)
try:
    pk.reshape_and_cache(k, k, kc, vc, torch.tensor([0, 64, 1], device=DEV))
except RuntimeError as e:
    print("raised:", str(e).splitlines()[0])
q = torch.randn(1, 4, 64, device=DEV)
bt = torch.tensor([[0, 9]], dtype=torch.int32, device=DEV)
try:
    pk.paged_attention(q, kc, vc, bt, torch.tensor([20], dtype=torch.int32, device=DEV),
                       torch.tensor([0, 1], dtype=torch.int32, device=DEV), 0.1)
except RuntimeError as e:
    print("raised:", str(e).splitlines()[0])
try:
    pk.copy_blocks([kc], [vc], torch.tensor([[0, 4]], device=DEV))
except RuntimeError as e:
    print("raised:", str(e).splitlines()[0])
"""


def test_debug_mode_checks_ranges_on_the_host(be):
    module = "torch_pagedkv" if be.name == "cuda" else "torch_pagedkv.emulation"
    script = DEBUG_SCRIPT.replace("PK", module).replace("DEV", repr(be.device))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**os.environ, "PAGEDKV_DEBUG": "1"})
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines == [
        "raised: reshape_and_cache: slot_mapping[1] must be < num_blocks * block_size = 64 "
        "(or negative to skip), got 64",
        "raised: paged_attention: block_table[0, 1] must be in [0, num_blocks = 4), got 9",
        "raised: copy_blocks: block_mapping[0, 1] (dst) must be in [0, 4), got 4",
    ], run.stdout


@CUDA_ONLY
def test_bad_devices_are_refused(be):
    batch = make_batch([(1, 20)], 4, 2, 64, 16, torch.float32, device=be.device)
    with pytest.raises(RuntimeError, match="query must be on cuda"):
        pk.paged_attention(batch.query.cpu(), *batch.attention_args()[1:], 0.1)
    with pytest.raises(RuntimeError, match="seq_lens must be on cuda"):
        args = list(batch.attention_args())
        args[4] = args[4].cpu()
        pk.paged_attention(*args, 0.1)


def test_misaligned_caches_are_refused(be):
    batch = make_batch([(1, 20)], 4, 2, 64, 16, torch.float32, device=be.device)
    flat = torch.randn(batch.key_cache.numel() + 1, device=be.device)
    shifted = flat[1:].view(batch.key_cache.shape)  # contiguous, but 4 bytes off alignment
    with pytest.raises(RuntimeError, match="key_cache data must be 16-byte aligned"):
        be.ops.paged_attention(batch.query, shifted, batch.value_cache,
                               *batch.attention_args()[3:], 0.1)


def test_opcheck_decode_with_partitions(be, configs):
    configs(64, torch.float32, 16, partition_size=64)
    b = make_batch([(1, 300), (1, 7), (1, 129)], 8, 2, 64, 16, torch.float32, device=be.device)
    torch.library.opcheck(be.ns.paged_attention.default,
                          (*b.attention_args(), 0.125))


# ------------------------------------------------------------------------------------
# paged_attention_lse, merge_attn_states (cascade attention)
# ------------------------------------------------------------------------------------

PREFIX_PASS = [(7, 37), (5, 0), (40, 20), (0, 5), (64, 48), (1, 16)]


def attend_lse(batch, path, causal, **kw):
    scale = 1.0 / math.sqrt(batch.query.shape[-1])
    kw.setdefault("k_scale", batch.k_scale)
    kw.setdefault("v_scale", batch.v_scale)
    with knobs.override(attention_path=path):
        return ops_of(batch.query).paged_attention_lse(*batch.attention_args(), scale,
                                                       causal=causal, **kw)


def assert_lse_matches(batch, out, lse, dtype, causal, **kw):
    scale = 1.0 / math.sqrt(batch.query.shape[-1])
    kw.setdefault("k_scale", batch.k_scale)
    kw.setdefault("v_scale", batch.v_scale)
    cpu = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()}
    ref_out, ref_lse = reference.paged_attention_lse(*[a.cpu() for a in batch.attention_args()],
                                                     scale, causal=causal, **cpu)
    assert_matches(out, ref_out, dtype)
    none = ref_lse == -math.inf
    assert torch.equal(lse.cpu() == -math.inf, none)
    torch.testing.assert_close(lse.cpu()[~none], ref_lse[~none], atol=2e-3, rtol=0)


@pytest.mark.simt_sample(8)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("cache_dtype", [None] + FP8_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_size,block_size", [(128, 16), (64, 8), (256, 32), (40, 12)])
def test_lse_both_kernels(be, path, causal, dtype, cache_dtype, head_size, block_size):
    """Both kernels write lse; causal=False rows see their whole sequence (more rows than
    keys, an empty sequence); with causal=True out is paged_attention's, bit for bit."""
    seqs = MIXED if causal else PREFIX_PASS
    batch = make_batch(seqs, 8, 2, head_size, block_size, dtype, cache_dtype, device=be.device,
                       seed=head_size + block_size)
    out, lse = attend_lse(batch, path, causal)
    assert_lse_matches(batch, out, lse, dtype, causal)
    if causal:
        assert torch.equal(out, attend(batch, path))


@pytest.mark.parametrize("partition_size", [64, 512])
@pytest.mark.parametrize("causal", [True, False])
def test_lse_of_split_k_rows(be, configs, partition_size, causal):
    """Rows over many partitions get their lse from the split-K reduce, rows within one
    partition from the decode kernel itself."""
    P = partition_size
    lens = [1, P - 1, P, P + 1, 2 * P, 3 * P + 5, 0 if not causal else 7]
    configs(64, torch.float32, 16, partition_size=P)
    batch = make_batch([(1, n) for n in lens], 4, 2, 64, 16, torch.float32, device=be.device,
                       columns=-(-max(lens) // 16) + 3)
    out, lse = attend_lse(batch, "decode", causal)
    assert_lse_matches(batch, out, lse, torch.float32, causal)


@pytest.mark.parametrize("path", PATHS)
def test_lse_features(be, path):
    batch = make_batch([(1, 1500), (40, 900), (0, 3), (9, 9)], 16, 4, 128, 16, torch.bfloat16,
                       device=be.device, seed=3)
    kw = dict(sliding_window=100, softcap=2.0,
              alibi_slopes=torch.rand(16, generator=torch.Generator().manual_seed(2)).to(be.device))
    out, lse = attend_lse(batch, path, True, **kw)
    assert_lse_matches(batch, out, lse, torch.bfloat16, True, **kw)
    out, lse = attend_lse(batch, path, False, softcap=2.0)
    assert_lse_matches(batch, out, lse, torch.bfloat16, False, softcap=2.0)


@pytest.mark.simt_sample(3)
@pytest.mark.parametrize("dtype_a", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("dtype_b", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_size", [8, 128, 200])
def test_merge_attn_states_kernel(be, dtype_a, dtype_b, head_size):
    g = torch.Generator().manual_seed(head_size)
    t, h = 300, 5
    out_a = torch.randn(t, h, head_size, generator=g).to(dtype_a)
    out_b = torch.randn(t, h, head_size, generator=g).to(dtype_b)
    lse_a, lse_b = torch.randn(t, h, generator=g) * 5, torch.randn(t, h, generator=g) * 5
    lse_a[::7] = -math.inf
    lse_b[::5] = -math.inf
    out, lse = be.ops.merge_attn_states(out_a.to(be.device), lse_a.to(be.device),
                                        out_b.to(be.device), lse_b.to(be.device))
    ref_out, ref_lse = reference.merge_attn_states(out_a, lse_a, out_b, lse_b)
    assert out.dtype == dtype_a
    assert_matches(out, ref_out, dtype_a)
    assert torch.equal(lse.cpu().isinf(), ref_lse.isinf())
    torch.testing.assert_close(lse.cpu().nan_to_num(neginf=0.0), ref_lse.nan_to_num(neginf=0.0),
                               atol=1e-5, rtol=0)


@CUDA_ONLY
def test_cascade_replays_in_a_cuda_graph(be):
    """cascade_attention captured once replays correctly for steps with other groups: the
    planner's cascade tensors keep their shapes and addresses; only their values change."""
    from torch_pagedkv.cache import StepPlanner
    from torch_pagedkv.cache.step_plan import ALWAYS_CASCADE
    from torch_pagedkv.layers.attention import cascade_attention
    from paged_inputs import prefix_group_rows

    steps = [  # 12 sequence rows and at most 16 query rows each, different groups
        ([(3, [(0, 1), (5, 1), (2, 1), (1, 1)]), (2, [(4, 1), (0, 1)])], [(40, 1)] * 6),
        ([(5, [(0, 1)] * 9)], [(9, 2), (17, 4), (30, 1)]),
        ([(1, [(0, 2), (7, 1)]), (2, [(2, 1)] * 4), (4, [(0, 1), (0, 1)])], [(5, 1)] * 4),
    ]
    planner = StepPlanner(16, max_num_seqs=16, max_num_tokens=16, max_blocks_per_seq=12,
                          device=be.device, cascade=ALWAYS_CASCADE)
    g = torch.Generator().manual_seed(0)
    kc = random_cache(256, 16, 2, 64, torch.bfloat16, "cuda", g)
    vc = random_cache(256, 16, 2, 64, torch.bfloat16, "cuda", g)
    query = torch.zeros(16, 8, 64, dtype=torch.bfloat16, device=be.device)
    step_rows = [prefix_group_rows(groups, loners, 16, seed=i)[0]
                 for i, (groups, loners) in enumerate(steps)]
    assert all(len(rows) == 12 for rows in step_rows)
    meta = planner.plan(step_rows[0], num_tokens=16, num_seqs=13)  # fixed shapes
    out = cascade_attention(query, kc, vc, meta.cascade, scale=0.125)  # warm up
    be.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cascade_attention(query, kc, vc, meta.cascade, scale=0.125)
    for rows in step_rows[::-1]:
        new = planner.plan(rows, num_tokens=16, num_seqs=13)
        assert new.cascade is not None
        assert new.cascade.query_order.data_ptr() == meta.cascade.query_order.data_ptr()
        query.copy_(torch.randn(16, 8, 64, generator=g).to(torch.bfloat16))
        graph.replay()
        want = reference.paged_attention(query.cpu(), kc.cpu(), vc.cpu(), new.block_table.cpu(),
                                         new.seq_lens.cpu(), new.query_start_loc.cpu(), 0.125)
        assert_matches(out, want, torch.bfloat16)


@pytest.mark.simt_sample(4)
# ------------------------------------------------------------------------------------
# reshape_and_cache
# ------------------------------------------------------------------------------------

@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("cache_dtype", [None] + FP8_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_size,kv_heads", [(128, 8), (64, 1), (40, 3), (512, 2)])
def test_reshape_and_cache_bit_exact(be, aligned, dtype, cache_dtype, head_size, kv_heads):
    """Vector (aligned) and scalar (misaligned view) paths store exactly the reference's
    bytes, fp8 saturation and NaN -> 0 included; negative and out-of-range slots skip."""
    cache_dtype = cache_dtype or dtype
    g = torch.Generator().manual_seed(head_size)
    n, nb, bs = 50, 9, 16
    shape = (n, kv_heads, head_size)
    k = (torch.randn(shape, generator=g) * 300).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    k[0, 0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30]).to(dtype)
    slots = torch.randperm(nb * bs, generator=g)[:n]
    slots[3], slots[7], slots[11] = -1, nb * bs, 10**12  # padding, out of range: skipped
    kc = random_cache(nb, bs, kv_heads, head_size, cache_dtype, "cpu", g)
    vc = random_cache(nb, bs, kv_heads, head_size, cache_dtype, "cpu", g)
    scales = (torch.tensor([0.7]), torch.tensor([1.3])) if cache_dtype in FP8_DTYPES else (None, None)
    want_k, want_v = kc.clone(), vc.clone()
    keep = (slots >= 0) & (slots < nb * bs)
    reference.reshape_and_cache(k[keep], v[keep], want_k, want_v, slots[keep], *scales)

    def on_gpu(t):
        if aligned:
            return t.to(be.device)
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=be.device)  # one element off
        view = buf[1:].view(t.shape)
        view.copy_(t)
        return view

    gk, gv = on_gpu(k), on_gpu(v)
    ck, cv = kc.to(be.device), vc.to(be.device)
    be.ops.reshape_and_cache(gk, gv, ck, cv, slots.to(be.device),
                         *[s.to(be.device) if s is not None else None for s in scales])
    assert torch.equal(ck.cpu().view(torch.uint8), want_k.view(torch.uint8))
    assert torch.equal(cv.cpu().view(torch.uint8), want_v.view(torch.uint8))


@pytest.mark.parametrize("write_threads", [64, 96, 256, 512])
def test_reshape_and_cache_threads(be, configs, write_threads):
    configs(64, torch.float16, 16, write_threads=write_threads)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(333, 5, 64, generator=g).half()
    slots = torch.randperm(40 * 16, generator=g)[:333]
    kc, vc = torch.zeros(40, 16, 5, 64).half(), torch.zeros(40, 16, 5, 64).half()
    ck, cv = kc.to(be.device), vc.to(be.device)
    reference.reshape_and_cache(k, k, kc, vc, slots)
    be.ops.reshape_and_cache(k.to(be.device), k.to(be.device), ck, cv, slots.to(be.device))
    assert torch.equal(ck.cpu(), kc) and torch.equal(cv.cpu(), vc)


# ------------------------------------------------------------------------------------
# copy_blocks, swap_blocks
# ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mapping_on", ["host", "device"])
@pytest.mark.parametrize("num_layers", [1, 3, 96, 97, 200])
def test_copy_blocks_many_layers(be, mapping_on, num_layers):
    """One launch per 96 layers; layers may differ in shape and dtype."""
    g = torch.Generator().manual_seed(num_layers)
    shapes = [(10, 16, 2, 64), (12, 8, 1, 40), (10, 3, 3, 8)]
    dtypes = [torch.float16, torch.float8_e5m2, torch.float32]
    keys, values = [], []
    for i in range(num_layers):
        shape, dtype = shapes[i % 3], dtypes[i % 3]
        keys.append(random_cache(*shape, dtype, "cpu", g))
        values.append(random_cache(*shape, dtype, "cpu", g))
    mapping = torch.tensor([[0, 5], [3, 7], [3, 9], [8, 1]])
    gk, gv = [k.to(be.device) for k in keys], [v.to(be.device) for v in values]
    reference.copy_blocks(keys, values, mapping)
    be.ops.copy_blocks(gk, gv, mapping.to("cpu" if mapping_on == "host" else be.device))
    for got, want in zip(gk + gv, keys + values):
        assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8))


def test_copy_blocks_out_of_range_device_mapping_is_skipped(be):
    kc = torch.randn(6, 16, 2, 64, device=be.device)
    vc = torch.randn_like(kc)
    before_k, before_v = kc.clone(), vc.clone()
    be.ops.copy_blocks([kc], [vc], torch.tensor([[0, 2], [6, 1], [1, -1], [-9, 3]], device=be.device))
    be.synchronize()
    before_k[2], before_v[2] = before_k[0], before_v[0]
    assert torch.equal(kc, before_k) and torch.equal(vc, before_v)


@CUDA_ONLY  # the emulator's CPU tensors are device memory: its mappings are device-resident
def test_copy_blocks_out_of_range_cpu_mapping_raises_and_writes_nothing(be):
    kc = torch.randn(6, 16, 2, 64, device=be.device)
    before = kc.clone()
    with pytest.raises(RuntimeError, match=r"block_mapping\[1, 0\] \(src\) must be in \[0, 6\)"):
        pk.copy_blocks([kc], [kc.clone()], torch.tensor([[0, 2], [6, 1]]))
    assert torch.equal(kc, before)


SWAP_DEVICES = [("device", "host"), ("host", "device"), ("device", "device")]


@pytest.mark.parametrize("src_device,dst_device", SWAP_DEVICES)
@pytest.mark.parametrize("mapping_on", ["host", "device"])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=dtype_id)
def test_swap_blocks(be, src_device, dst_device, mapping_on, cache_dtype):
    if be.name == "simt" and "host" in (src_device, dst_device, mapping_on):
        pytest.skip("the emulator has no host memory apart from its device's")
    g = torch.Generator().manual_seed(1)
    src = random_cache(12, 16, 2, 64, cache_dtype, "cpu", g)
    dst = random_cache(9, 16, 2, 64, cache_dtype, "cpu", g)
    # Consecutive runs (0..2 -> 4..6) are merged into one copy; the rest are single blocks.
    mapping = torch.tensor([[0, 4], [1, 5], [2, 6], [11, 0], [7, 8], [7, 2]])
    want = dst.clone()
    reference.swap_blocks(src, want, mapping)
    gsrc = src.to(be.device) if src_device == "device" else src.pin_memory()
    gdst = dst.to(be.device) if dst_device == "device" else dst.pin_memory()
    be.ops.swap_blocks(gsrc, gdst, mapping.to("cpu" if mapping_on == "host" else be.device))
    be.synchronize()
    assert torch.equal(gdst.cpu().view(torch.uint8), want.view(torch.uint8))


@CUDA_ONLY
def test_swap_blocks_device_mapping_needs_pinned_cpu_memory(be):
    src = torch.randn(4, 16, 2, 64, device=be.device)
    dst = torch.zeros(4, 16, 2, 64)  # pageable
    with pytest.raises(RuntimeError, match="dst is on the CPU and block_mapping on cuda"):
        pk.swap_blocks(src, dst, torch.tensor([[0, 1]], device=be.device))
    pk.swap_blocks(src, dst, torch.tensor([[0, 1]]))  # a host mapping works with any memory
    assert torch.equal(dst[1], src[0].cpu())


def test_swap_blocks_out_of_range_device_mapping_is_skipped(be):
    src = torch.randn(4, 16, 2, 64, device=be.device)
    dst = torch.zeros(4, 16, 2, 64)
    dst = dst.pin_memory() if be.name == "cuda" else dst  # host memory, where there is any
    be.ops.swap_blocks(src, dst, torch.tensor([[0, 1], [4, 2], [1, 9]], device=be.device))
    be.synchronize()
    want = torch.zeros(4, 16, 2, 64)
    want[1] = src[0].cpu()
    assert torch.equal(dst, want)


@CUDA_ONLY
def test_swap_blocks_out_of_range_cpu_mapping_raises_and_writes_nothing(be):
    src = torch.randn(4, 16, 2, 64, device=be.device)
    dst = torch.zeros(4, 16, 2, 64, device=be.device)
    with pytest.raises(RuntimeError, match=r"block_mapping\[1, 1\] \(dst\) must be in \[0, 4\)"):
        pk.swap_blocks(src, dst, torch.tensor([[0, 1], [2, 4]]))
    assert not dst.any()


# ------------------------------------------------------------------------------------
# caches past 2^31 elements: every offset must be 64-bit
# ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
@CUDA_ONLY  # two 17 GB caches
def test_cache_larger_than_2_31_elements(be, path):
    """fp8 caches of 33000 x 16 x 8 x 512 (2.16e9 elements each) with every block id near
    the end: write, attend, copy_blocks and swap_blocks there agree with the same ops on a
    small cache holding the same blocks (an int32 offset would wrap and read elsewhere)."""
    nb, bs, kvh, d, heads, ctx = 33000, 16, 8, 512, 16, 70
    assert nb * bs * kvh * d > 2**31
    g = torch.Generator(device=be.device).manual_seed(0)
    big = [torch.zeros(nb, bs, kvh, d, dtype=torch.float8_e4m3fn, device=be.device)
           for _ in range(2)]
    small = [torch.zeros(12, bs, kvh, d, dtype=torch.float8_e4m3fn, device=be.device)
             for _ in range(2)]
    first = nb - 10  # two sequences of 5 blocks in the last 10
    table_small = torch.arange(10, dtype=torch.int32, device=be.device).view(2, 5)
    positions = torch.arange(ctx, device=be.device)
    slots_small = torch.cat([table_small[i, positions // bs].long() * bs + positions % bs
                             for i in range(2)])
    k, v = (torch.randn(2 * ctx, kvh, d, generator=g, device=be.device, dtype=torch.bfloat16)
            for _ in range(2))
    pk.reshape_and_cache(k, v, *big, slots_small + first * bs)
    pk.reshape_and_cache(k, v, *small, slots_small)
    for b, s in zip(big, small):
        assert torch.equal(b[first:].view(torch.uint8), s[:10].view(torch.uint8))

    seq_lens = torch.full((2,), ctx, dtype=torch.int32, device=be.device)
    q_len = 1 if path == "decode" else ctx
    qsl = torch.tensor([0, q_len, 2 * q_len], dtype=torch.int32, device=be.device)
    q = torch.randn(2 * q_len, heads, d, generator=g, device=be.device, dtype=torch.bfloat16)
    with knobs.override(attention_path=path):
        out_big = pk.paged_attention(q, *big, table_small + first, seq_lens, qsl, d ** -0.5)
        out_small = pk.paged_attention(q, *small, table_small, seq_lens, qsl, d ** -0.5)
    torch.testing.assert_close(out_big, out_small, atol=0, rtol=0)
    ref = reference.paged_attention(q.cpu(), small[0].cpu(), small[1].cpu(), table_small.cpu(),
                                    seq_lens.cpu(), qsl.cpu(), d ** -0.5)
    assert_matches(out_big, ref, torch.bfloat16)

    pk.copy_blocks([big[0]], [big[1]], torch.tensor([[nb - 1, 0], [3, nb - 2]], device=be.device))
    assert torch.equal(big[0][0].view(torch.uint8), big[0][nb - 1].view(torch.uint8))
    assert torch.equal(big[1][nb - 2].view(torch.uint8), big[1][3].view(torch.uint8))
    host = torch.zeros(2, bs, kvh, d, dtype=torch.float8_e4m3fn, pin_memory=True)
    pk.swap_blocks(big[0], host, torch.tensor([[nb - 1, 0], [nb - 3, 1]]))
    be.synchronize()
    assert torch.equal(host[0].view(torch.uint8), big[0][nb - 1].cpu().view(torch.uint8))
    assert torch.equal(host[1].view(torch.uint8), big[0][nb - 3].cpu().view(torch.uint8))
