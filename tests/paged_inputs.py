"""Random paged-cache inputs for the op tests: caches full of random data (never zeros),
block tables drawn as random permutations, mixed batches described by (q_len, seq_len),
and steps of sequences sharing prefix blocks (cascade)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from torch_pagedkv import reference

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FP8_DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2]

# Tolerance of an output in `dtype` against the float32 reference.
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclass
class Batch:
    query: Tensor
    key_cache: Tensor
    value_cache: Tensor
    block_table: Tensor
    seq_lens: Tensor
    query_start_loc: Tensor
    k_scale: Tensor | None
    v_scale: Tensor | None

    def attention_args(self) -> tuple:
        return (self.query, self.key_cache, self.value_cache, self.block_table, self.seq_lens,
                self.query_start_loc)


def random_cache(num_blocks, block_size, num_kv_heads, head_size, cache_dtype, device, gen,
                 scale: float = 1.0) -> Tensor:
    x = torch.randn(num_blocks, block_size, num_kv_heads, head_size, generator=gen)
    if cache_dtype in FP8_DTYPES:
        return reference.quantize(x, cache_dtype, torch.tensor([scale])).to(device)
    return x.to(cache_dtype).to(device)


def make_batch(seqs: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_size: int,
               block_size: int, dtype: torch.dtype, cache_dtype: torch.dtype | None = None,
               device: str = "cpu", seed: int = 0, spare_blocks: int = 3,
               extra_columns: int = 1, num_blocks: int | None = None,
               columns: int | None = None) -> Batch:
    """seqs: (q_len, seq_len) per sequence; q_len <= seq_len. num_blocks / columns fix the
    cache and block-table sizes (as an engine does) instead of fitting them to seqs."""
    cache_dtype = cache_dtype or dtype
    gen = torch.Generator().manual_seed(seed)
    need = [-(-seq_len // block_size) for _, seq_len in seqs]
    num_blocks = num_blocks or sum(need) + spare_blocks
    assert num_blocks >= sum(need)
    fp8 = cache_dtype in FP8_DTYPES
    k_scale = torch.tensor([0.37], device=device) if fp8 else None
    v_scale = torch.tensor([1.9], device=device) if fp8 else None
    key_cache = random_cache(num_blocks, block_size, num_kv_heads, head_size, cache_dtype, device,
                             gen, 0.37)
    value_cache = random_cache(num_blocks, block_size, num_kv_heads, head_size, cache_dtype,
                               device, gen, 1.9)
    perm = torch.randperm(num_blocks, generator=gen)
    cols = columns or max(need + [0]) + extra_columns
    # Entries past a sequence's blocks hold junk (out-of-range ids): they must be ignored.
    table = torch.full((len(seqs), cols), num_blocks + 1000, dtype=torch.int32)
    start = 0
    for i, n in enumerate(need):
        table[i, :n] = perm[start:start + n].int()
        start += n
    q_lens = [q for q, _ in seqs]
    qsl = torch.tensor([0] + torch.tensor(q_lens, dtype=torch.int64).cumsum(0).tolist(),
                       dtype=torch.int32)
    query = torch.randn(sum(q_lens), num_heads, head_size, generator=gen).to(dtype)
    return Batch(query.to(device), key_cache, value_cache, table.to(device),
                 torch.tensor([s for _, s in seqs], dtype=torch.int32, device=device),
                 qsl.to(device), k_scale, v_scale)


def prefix_group_rows(groups, loners, block_size: int, seed: int = 0):
    """Planner rows (block ids, num_computed, num_new) of a step with shared prefixes.

    groups: [(shared blocks, [(tokens after the prefix before the queries, q_len), ...])];
    loners: [(seq_len, q_len)]. Members of a group share physical blocks; the rows take
    the groups in turn, so members are not contiguous in the step; physical ids are a
    random permutation. Returns (rows, blocks used)."""
    by_group = []
    next_block = 0
    for shared, members in groups:
        prefix = list(range(next_block, next_block + shared))
        next_block += shared
        rows = []
        for extra, q_len in members:
            computed = shared * block_size + extra
            own = -(-(computed + q_len) // block_size) - shared
            rows.append((prefix + list(range(next_block, next_block + own)), computed, q_len))
            next_block += own
        by_group.append(rows)
    for seq_len, q_len in loners:
        n = -(-seq_len // block_size)
        by_group.append([(list(range(next_block, next_block + n)), seq_len - q_len, q_len)])
        next_block += n
    rows = []
    while any(by_group):
        for r in by_group:
            if r:
                rows.append(r.pop(0))
    perm = torch.randperm(next_block, generator=torch.Generator().manual_seed(seed)).tolist()
    return [([perm[b] for b in ids], c, n) for ids, c, n in rows], next_block
