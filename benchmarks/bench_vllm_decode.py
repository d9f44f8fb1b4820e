"""Where a decode step's attention time goes (issue 26): one layer's decode call of each
bench_vllm workload, ours (as torch_pagedkv.vllm.backend makes it) vs vLLM's CPU_ATTN
kernels, outside vLLM, with the cache cold and resident.

The batch is bench_vllm's workload half-way through its decode (prompt + half the new
tokens per request), on bench_vllm's model shape (8 query / 2 KV heads of 64), block size
32, blocks at random places of the pool, prefix blocks shared the way vLLM's prefix cache
shares them. A call is the backend's KV write of the batch's new tokens + its attention:
ours `reshape_and_cache` + `paged_attention` (or cascade attention, when the backend's
metadata builder would plan it), CPU_ATTN's `cpu_attn_reshape_and_cache` +
`cpu_attention_with_kv_cache` (its scheduler metadata is built outside the timed call, as
vLLM's metadata builder does). Both caches hold the same keys and values (each written by its own
backend's reshape_and_cache), and the two outputs are checked to agree.
  cold: a 64 MiB buffer (twice this machine's L3) is read before each timed call, as the
        other layers' caches and weights do to a layer's blocks inside vLLM;
  resident: the same work (seq_lens, cascade plan) with every block-table entry folded
        onto 8 blocks (256 KiB, L2-resident): the call with no memory waits, its arithmetic.
cold - resident is the time the call waits on memory.

    .venv-vllm/bin/python -m benchmarks.bench_vllm_decode [--rounds N] [--dtypes D]
        [--workloads W] [--threads N] [--write-results]
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import replace

from benchmarks import machine
from benchmarks.bench_vllm import (BLOCK_SIZE, LONG_DECODE, add_workload_args,
                                    long_workloads, workloads)

HEADS, KV_HEADS, HEAD_SIZE = 8, 2, 64
FLUSH_BYTES = 64 << 20
MODES = ("cold", "resident")
RESIDENT_BLOCKS = 8  # 8 x 32 tokens x 2 x 64 x 2 (K, V) x 4 B = 256 KiB


def decode_batch(prompts: list[list[int]], new_tokens: int, seed: int = 0):
    """seq_lens and a block table for the batch half-way through its decode: requests whose
    prompts start with the same whole blocks share those blocks, as vLLM's prefix cache
    hands them out; every other block sits at a random place of the pool."""
    import torch
    rng = random.Random(seed)
    lens = [len(p) + new_tokens // 2 for p in prompts]
    blocks_of = [(n + BLOCK_SIZE - 1) // BLOCK_SIZE for n in lens]
    shared: dict[tuple, int] = {}
    pool = list(range(1, sum(blocks_of) + 1))
    rng.shuffle(pool)
    table = torch.zeros(len(prompts), max(blocks_of), dtype=torch.int32)
    for i, (p, nb) in enumerate(zip(prompts, blocks_of)):
        for b in range(nb):
            key = tuple(p[:(b + 1) * BLOCK_SIZE]) if (b + 1) * BLOCK_SIZE <= len(p) else None
            if key is not None and key in shared:
                table[i, b] = shared[key]
                continue
            table[i, b] = pool.pop()
            if key is not None:
                shared[key] = int(table[i, b])
    return torch.tensor(lens, dtype=torch.int32), table, sum(blocks_of) + 1


def calls(prompts, new_tokens: int, dtype):
    """(ours, theirs): the two backends' decode calls of one layer on the same batch."""
    import torch
    import vllm._custom_ops as vops

    import torch_pagedkv.ops as ops
    from torch_pagedkv.layers.attention import cascade_attention
    from torch_pagedkv.vllm.cascade import plan_cascade

    seq_lens, table, num_blocks = decode_batch(prompts, new_tokens)
    n = len(prompts)
    scale = HEAD_SIZE ** -0.5
    qsl = torch.arange(n + 1, dtype=torch.int32)
    slots = ((table[torch.arange(n), (seq_lens.long() - 1) // BLOCK_SIZE].long() * BLOCK_SIZE)
             + (seq_lens.long() - 1) % BLOCK_SIZE)
    q = torch.randn(n, HEADS, HEAD_SIZE).to(dtype)
    k_new = torch.randn(n, KV_HEADS, HEAD_SIZE).to(dtype)
    v_new = torch.randn(n, KV_HEADS, HEAD_SIZE).to(dtype)

    # Ours: vLLM's LHBNC buffer [2, blocks, block_size, heads * head], K then V planes.
    kv = torch.empty(2, num_blocks, BLOCK_SIZE, KV_HEADS * HEAD_SIZE, dtype=dtype)
    shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_SIZE)
    key_cache, value_cache = kv[0].view(shape), kv[1].view(shape)
    # CPU_ATTN's: [blocks, kv heads, 2 * block_size, head] in its own order within a
    # block, which only its reshape_and_cache writes. Both get the same key and value in
    # every slot, so the two calls' outputs must agree.
    theirs_kv = torch.empty(num_blocks, KV_HEADS, 2 * BLOCK_SIZE, HEAD_SIZE, dtype=dtype)
    k_c, v_c = theirs_kv.chunk(2, dim=2)
    all_slots = torch.arange(num_blocks * BLOCK_SIZE, dtype=torch.int64)
    keys = torch.randn(len(all_slots), KV_HEADS, HEAD_SIZE).to(dtype)
    values = torch.randn(len(all_slots), KV_HEADS, HEAD_SIZE).to(dtype)
    ops.reshape_and_cache(keys, values, key_cache, value_cache, all_slots, None, None)
    vops.cpu_attn_reshape_and_cache(keys, values, k_c, v_c, all_slots, "vec")
    del keys, values
    plan = plan_cascade(table, seq_lens, qsl, BLOCK_SIZE)
    out = torch.empty(n, HEADS, HEAD_SIZE, dtype=dtype)
    out2 = torch.empty(n, HEADS, HEAD_SIZE, dtype=dtype)
    meta = vops.cpu_attn_get_scheduler_metadata(
        num_reqs=n, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_SIZE,
        seq_lens=seq_lens, dtype=dtype, query_start_loc=qsl, causal=True,
        sliding_window_size=-1, isa="vec", enable_kv_split=False)

    def make(table, plan, slots):
        def ours():
            ops.reshape_and_cache(k_new, v_new, key_cache, value_cache, slots, None, None)
            if plan is not None:
                o = cascade_attention(q, key_cache, value_cache, plan, scale=scale)
            else:
                o = ops.paged_attention(q, key_cache, value_cache, table, seq_lens, qsl,
                                        scale, None, -1, 0.0, None, None)
            out.copy_(o)

        def theirs():
            vops.cpu_attn_reshape_and_cache(k_new, v_new, k_c, v_c, slots, "vec")
            vops.cpu_attention_with_kv_cache(
                query=q, key_cache=k_c, value_cache=v_c, output=out2, query_start_loc=qsl,
                seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None,
                sliding_window=-1, block_table=table, softcap=0.0, scheduler_metadata=meta,
                s_aux=None)
        return ours, theirs

    ours, theirs = make(table, plan, slots)
    ours()
    theirs()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    if not torch.allclose(out.float(), out2.float(), atol=tol, rtol=tol):
        raise RuntimeError(f"bench_vllm_decode: the two backends' outputs differ by "
                           f"{(out.float() - out2.float()).abs().max().item():.3g}")
    # The same work over RESIDENT_BLOCKS blocks (every table entry folded onto them, the
    # cascade plan kept): the data stays in L2, so this is the call without memory waits.
    fold = lambda t: t % RESIDENT_BLOCKS + 1  # noqa: E731
    folded = None if plan is None else replace(
        plan, prefix_block_table=fold(plan.prefix_block_table),
        suffix_block_table=fold(plan.suffix_block_table))
    resident = make(fold(table), folded, torch.arange(n, dtype=torch.int64) + BLOCK_SIZE)
    kv_bytes = int(seq_lens.sum()) * KV_HEADS * HEAD_SIZE * 2 * key_cache.element_size()
    return {"cold": (ours, theirs), "resident": resident}, plan is not None, kv_bytes


def timed(fn, cold: bool, flush, reps: int) -> float:
    """Median ms of reps calls (3 untimed first)."""
    times = []
    for i in range(reps + 3):
        if cold:
            flush()
        t0 = time.perf_counter()
        fn()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args(argv)
    try:
        import vllm._custom_ops  # noqa: F401
    except ImportError:
        print("bench_vllm_decode needs the vLLM environment (.venv-vllm)")
        return 0
    import torch
    torch.set_num_threads(args.threads)
    scratch = torch.ones(FLUSH_BYTES // 4)
    flush = lambda: float(scratch.sum())  # noqa: E731
    loads = {**workloads(), **long_workloads()}
    decodes = {**{w: args.decode for w in ("shared", "varied")}, **LONG_DECODE}
    print(machine.line(args.threads), flush=True)
    rows = []
    for dt in args.dtypes.split(","):
        dtype = getattr(torch, dt)
        for w in args.workloads.split(","):
            fns, cascade, kv_bytes = calls(loads[w], decodes[w], dtype)
            r = {f"{who} {mode}": [] for mode in MODES for who in ("ours", "theirs")}
            for i in range(args.rounds):  # interleaved, order alternating
                for mode in MODES:
                    pair = list(zip(("ours", "theirs"), fns[mode]))[:: 1 if i % 2 == 0 else -1]
                    for who, fn in pair:
                        r[f"{who} {mode}"].append(
                            timed(fn, mode == "cold", flush, args.reps))
            med = {k: statistics.median(v) for k, v in r.items()}
            ratio = {m: statistics.median(a / b for a, b in zip(r[f"ours {m}"], r[f"theirs {m}"]))
                     for m in MODES}
            rows.append((dt, w, len(loads[w]), cascade, kv_bytes, med, ratio))
            print(dt, w, {k: round(v, 3) for k, v in med.items()}, flush=True)
    body = (f"Command: `.venv-vllm/bin/python -m benchmarks.bench_vllm_decode --rounds "
            f"{args.rounds}" + (f" --threads {args.threads}" if args.threads != 2 else "")
            + f"` ({machine.line(args.threads)}; one layer's decode call, KV write + "
            "attention, of each bench_vllm workload half-way through its decode; median "
            f"ms of {args.reps} calls, median over {args.rounds} interleaved rounds; cold: a "
            f"{FLUSH_BYTES >> 20} MiB read before each call; resident: the same work on "
            f"{RESIDENT_BLOCKS} blocks (L2); ratios: medians of per-round ratios):\n\n"
            "| dtype | workload | requests | ours | K+V MB of the batch | ours cold ms | "
            "CPU_ATTN cold ms | **cold: ours / theirs** | ours resident ms | "
            "CPU_ATTN resident ms | **resident: ours / theirs** | memory wait ours / "
            "CPU_ATTN ms (cold - resident) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    for dt, w, n, cascade, kv_bytes, med, ratio in rows:
        body += (f"| {dt} | {w} | {n} | {'cascade' if cascade else 'paged_attention'} | "
                 f"{kv_bytes / 1e6:.1f} | {med['ours cold']:.3f} | {med['theirs cold']:.3f} | "
                 f"**{ratio['cold']:.2f}x** | {med['ours resident']:.3f} | "
                 f"{med['theirs resident']:.3f} | **{ratio['resident']:.2f}x** | "
                 f"{med['ours cold'] - med['ours resident']:.3f} / "
                 f"{med['theirs cold'] - med['theirs resident']:.3f} |\n")
    print(body)
    if args.write_results:
        from benchmarks.results_file import write_section
        write_section("Decode calls outside vLLM: where the time goes (bench_vllm_decode)",
                      body.rstrip("\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
