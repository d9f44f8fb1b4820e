"""The SIMT emulator itself (csrc/simt, docs/emulation.md): kernels that break a rule on
purpose must fail with an error naming the kernel and what went wrong, never hang, crash or
pass; small correct kernels pin down its barrier and shuffle semantics, its thread orders
and its device profile. The CUDA kernels' own emulated tests are in test_cuda_ops.py (the
"simt" cases) and test_simt_ops.py."""
import pytest
import torch

from cuda_backends import emulation

pytestmark = pytest.mark.skipif(emulation is None, reason="the SIMT emulator is not built")


def run(case, threads=64):
    return torch.ops.pagedkv_simt._simt_selftest(case, threads)


@pytest.mark.parametrize("case,message", [
    ("divergent_barrier", r"kernel divergent_barrier, block \(0,0,0\): __syncthreads at "
                          r"csrc/simt/selftest.cpp:\d+ is reached by 16 of 64 threads; the others exited"),
    ("two_barriers", r"kernel two_barriers.*threads wait at different __syncthreads"),
    ("shuffles_at_two_calls", r"kernel shuffles_at_two_calls.*lanes of warp 0 disagree at "
                              r"__shfl_xor_sync at csrc/simt/selftest.cpp:\d+"),
    ("shuffle_after_a_lane_exits", r"kernel shuffle_after_a_lane_exits.*lane 3 is at exited"),
    ("shared_write_past_the_end", r"kernel shared_write_past_the_end, block \(0,0,0\), thread "
                                  r"\(0,0,0\): shared memory access at byte offset 4352 past the "
                                  r"launch's 256 bytes of dynamic shared memory"),
    ("shared_write_into_the_slack", r"a write at byte offset 20 past the launch's 20 bytes"),
    ("misaligned_load", r"kernel misaligned_load.*misaligned __ldg"),
    ("too_much_shared_memory", r"65536 bytes of dynamic shared memory, more than the kernel's "
                               r"limit of 49152 \(raise it with cudaFuncSetAttribute\)"),
    ("grid_too_large", r"invalid configuration argument.*grid \(1,70000,1\) exceeds"),
])
@pytest.mark.parametrize("order", ["random", "forward", "reverse"])
def test_broken_kernels_fail_with_a_clear_error(case, message, order):
    with emulation.settings(order=order):
        with pytest.raises(RuntimeError, match=message):
            run(case)


def test_too_many_threads_per_block():
    with pytest.raises(RuntimeError, match=r"block \(2048,1,1\) exceeds NVIDIA H100 80GB HBM3's "
                                           r"limits \(1024 threads"):
        run("shuffles", 2048)


def test_an_error_leaves_the_emulator_usable():
    with pytest.raises(RuntimeError):
        run("shared_write_past_the_end")
    with pytest.raises(RuntimeError):
        run("divergent_barrier")
    out = run("neighbour")
    assert out[:64].tolist() == [float((i + 1) % 64) for i in range(64)]


def test_raising_the_shared_memory_limit_admits_the_launch():
    run("raised_shared_memory")  # cudaFuncSetAttribute to 100 KiB, then a 64 KiB launch


@pytest.mark.parametrize("order", ["random", "forward", "reverse"])
def test_barrier_orders_every_order(order):
    with emulation.settings(order=order, seed=3):
        out = run("neighbour", 96)
    assert out[:96].tolist() == [float((i + 1) % 96) for i in range(96)]


def test_a_missing_barrier_reads_stale_shared_memory_in_every_order():
    """Thread i reads slot i + 1 (mod n) with no barrier after the writes. Forward (thread 0
    first): every thread but the last reads a slot not yet written, which still holds the
    0xff bytes every CTA starts with (a NaN); reverse: the last thread reads slot 0 before
    thread 0 writes it. A seeded random order catches it with near certainty."""
    want = [float((i + 1) % 64) for i in range(64)]
    with emulation.settings(order="forward"):
        fwd = run("neighbour_without_barrier", 64)[:64]
    with emulation.settings(order="reverse"):
        rev = run("neighbour_without_barrier", 64)[:64]
    with emulation.settings(order="random", seed=1):
        rnd = run("neighbour_without_barrier", 64)[:64]
    assert fwd[:63].isnan().all() and fwd[63] == want[63]
    assert rev[63].isnan() and rev[:63].tolist() == want[:63]
    assert rnd.isnan().any()


def test_shuffle_semantics():
    out = run("shuffles", 64)[:320].view(64, 5)
    for t in range(64):
        lane = t % 32
        v = lambda src: 100.0 + src  # noqa: E731
        seg8 = lane // 8 * 8
        down = lane + 1 if lane + 1 < seg8 + 8 else lane
        up = lane - 2 if lane - 2 >= seg8 else lane
        idx = lane // 16 * 16 + 5
        assert out[t].tolist() == [v(lane ^ 1), v(down), v(up), v(idx), sum(100.0 + i for i in range(32))]


def test_settings_and_counters():
    before = emulation.current_settings()
    with emulation.settings(order="reverse", seed=7, profile="H200"):
        s = emulation.current_settings()
        assert (s["order"], s["seed"], s["device"]) == ("reverse", 7, "NVIDIA H200")
    assert emulation.current_settings() == before
    emulation.reset_counters()
    run("neighbour", 64)
    c = emulation.counters()
    assert (c["launches"], c["ctas"], c["threads"], c["barriers"]) == (1, 1, 64, 64)
    assert c["kernels"] == ["neighbour<true>"]
    with pytest.raises(ValueError, match="profile must name one of"):
        emulation.configure(profile="A100")
    with pytest.raises(RuntimeError, match="order must be random, forward or reverse"):
        emulation.configure(order="sideways")


def test_device_queries_answer_from_the_profile():
    assert torch.ops.pagedkv_simt._launch_config("x", 128, "bfloat16", 16)[:4] == \
        torch.ops.pagedkv_simt._launch_config("y", 128, "bfloat16", 16)[:4]
    # 132 SMs: a batch-1 decode over 16 partitions gets them all as splits.
    rows, splits, scratch = torch.ops.pagedkv_simt._decode_plan(1, 1, 32, 8, 128, 16, 512, 512, 132, False)
    assert (rows, splits) == (1, 16)
    occ = torch.ops.pagedkv_simt._occupancy("decode", "bfloat16", "bfloat16", 128, 32, 8, 128, 512)
    assert occ[0] > 0 and occ[-1] == 132 and occ[-2] == 2048


def test_simt_vs_device_script_runs_against_the_reference():
    """scripts/simt_vs_device.py is what the first GPU run executes: here it compares the
    emulator with the reference, which must agree to float rounding and bit for bit on
    every write and fp8 conversion."""
    import json
    import pathlib
    import subprocess
    import sys
    import tempfile
    root = pathlib.Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as d:
        out = pathlib.Path(d) / "r.json"
        subprocess.run([sys.executable, "scripts/simt_vs_device.py", "--against", "reference",
                        "--json", str(out)], cwd=root, check=True, capture_output=True)
        results = json.loads(out.read_text())
    exact = {k: v for k, v in results.items() if "bytes" in k or "values" in k or "blocks" in k}
    assert len(exact) == 10 and not any(exact.values()), exact
    assert max(results.values()) < 2e-3, results
