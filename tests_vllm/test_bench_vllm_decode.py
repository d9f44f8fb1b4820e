"""bench_vllm_decode compares like with like: both backends' caches hold the same keys and
values, and its calls (cold and resident) give the same attention as CPU_ATTN's."""
import random

import pytest
import torch

from benchmarks import bench_vllm_decode as bench


def prompts(shared: int, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 8192) for _ in range(shared)]
    return [prefix + [rng.randrange(3, 8192) for _ in range(rng.randint(5, 90))]
            for _ in range(n)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shared,n,cascade", [(0, 5, False), (300, 20, True)])
def test_calls_agree_with_cpu_attn(dtype, shared, n, cascade):
    fns, planned, kv_bytes = bench.calls(prompts(shared, n), 8, dtype)  # raises if they differ
    assert planned == cascade
    assert kv_bytes > 0
    for ours, theirs in fns.values():
        ours()
        theirs()


def test_decode_batch_shares_whole_prefix_blocks():
    seq_lens, table, num_blocks = bench.decode_batch(prompts(100, 3), 4)
    # 100 shared tokens: 3 whole blocks of 32 are the same physical blocks in every row.
    assert (table[:, :3] == table[0, :3]).all()
    assert len(set(table[:, 3].tolist())) == 3
    assert int(table.max()) < num_blocks
    assert seq_lens.tolist() == [len(p) + 2 for p in prompts(100, 3)]
