"""Benchmark of the four ops on this machine (CPU), every number measured side by side.

(a) tensor-copy bandwidth (GB/s counting read + write) and read bandwidth (a sum() over
the K/V bytes), (b) reshape_and_cache GB/s, (c) decode paged_attention effective GB/s (K/V
bytes read once) and its ratio to the read bandwidth (its ceiling) and to the copy, (d)
the same decode by gather-then-SDPA and by PyTorch's paged FlexAttention (compiled), as
speedups, (e) prefill of 2048 tokens over
a 2048-token cached prefix, and a plain 2048-token prefill, in tokens/s against PyTorch's
scaled_dot_product_attention on the same K/V laid out contiguously, (f) a tiny decode
(batch 1 x context 16) idle and while another process keeps one core busy. This
machine's speed drifts 2x over minutes, so every variant is timed in interleaved rounds
and ratios are of per-round medians.

    python -m benchmarks.bench_ops [--json] [--rounds N] [--no-flex] [--write-results]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import torch_pagedkv as pk
from benchmarks import machine
from benchmarks.results_file import write_section

BATCH, CONTEXT, HEADS, KV_HEADS, HEAD, BLOCK = 16, 2048, 32, 8, 128, 16


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(variants: dict, rounds: int) -> dict:
    """Median seconds per variant, each round running every variant once. The order
    rotates every round: a variant timed right after the copy (which leaves hundreds of
    MB of dirty lines to write back) would otherwise always pay for it."""
    for fn in variants.values():
        fn()  # warm up (and compile)
    times = {k: [] for k in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed(variants[name]))
    return {k: statistics.median(v) for k, v in times.items()}


def decode_setup(dtype, gen, context=CONTEXT):
    """A decode batch: BATCH sequences of `context` tokens, blocks scattered at random."""
    num_blocks = BATCH * context // BLOCK
    kc = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD, generator=gen).to(dtype)
    vc = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD, generator=gen).to(dtype)
    table = torch.randperm(num_blocks, generator=gen).int().view(BATCH, context // BLOCK)
    seq_lens = torch.full((BATCH,), context, dtype=torch.int32)
    qsl = torch.arange(BATCH + 1, dtype=torch.int32)
    q = torch.randn(BATCH, HEADS, HEAD, generator=gen).to(dtype)
    return q, kc, vc, table, seq_lens, qsl


def gather_then_sdpa(q, kc, vc, table, seq_lens, scale):
    """What a plain-PyTorch user writes: gather each sequence's K/V, then SDPA."""
    b = q.shape[0]
    k = kc[table.long()].reshape(b, -1, KV_HEADS, HEAD).transpose(1, 2)
    v = vc[table.long()].reshape(b, -1, KV_HEADS, HEAD).transpose(1, 2)
    return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, scale=scale, enable_gqa=True)


def flex_paged_setup(kc, vc, table, q, scale):
    """PyTorch's own paged attention: FlexAttention over its PagedAttention page table."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n_pages = kc.shape[0]
    paged = PagedAttention(n_pages, BLOCK, BATCH, device="cpu")
    for b in range(BATCH):
        paged.reserve(torch.tensor(b), torch.tensor(CONTEXT))
    # Its cache layout is [1, kv_heads, pages * page_size, head]: the same K/V, repacked.
    k_cache = torch.zeros(1, KV_HEADS, n_pages * BLOCK, HEAD, dtype=kc.dtype)
    v_cache = torch.zeros_like(k_cache)
    batch_idx = torch.arange(BATCH)
    pos = torch.arange(CONTEXT).expand(BATCH, CONTEXT)
    k_vals = kc[table.long()].reshape(BATCH, CONTEXT, KV_HEADS, HEAD).transpose(1, 2)
    v_vals = vc[table.long()].reshape(BATCH, CONTEXT, KV_HEADS, HEAD).transpose(1, 2)
    paged.assign(batch_idx, pos, k_vals, v_vals, k_cache, v_cache)

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= CONTEXT - 1 + q_idx

    logical = create_block_mask(causal, BATCH, 1, 1, CONTEXT, device="cpu", BLOCK_SIZE=(1, BLOCK))
    block_mask = paged.convert_logical_block_mask(logical)
    score_mod = paged.get_score_mod(None)
    attend = torch.compile(flex_attention, fullgraph=True)
    query = q.unsqueeze(2)  # [B, H, 1, D]
    return lambda: attend(query, k_cache, v_cache, block_mask=block_mask, score_mod=score_mod,
                          scale=scale, enable_gqa=True)


def bench_decode(dtype, rounds, flex, gen):
    q, kc, vc, table, seq_lens, qsl = decode_setup(dtype, gen)
    scale = 1.0 / math.sqrt(HEAD)
    kv_bytes = 2 * kc.numel() * kc.element_size()
    src = torch.randn(kv_bytes // kc.element_size(), generator=gen).to(dtype)
    dst = torch.empty_like(src)
    # The read ceiling: a float32 sum over the same bytes (a bf16 sum is bound by widening).
    read_src = torch.randn(kv_bytes // 4, generator=gen)

    def ours():
        return pk.paged_attention(q, kc, vc, table, seq_lens, qsl, scale)

    variants = {"copy": lambda: dst.copy_(src), "read": lambda: read_src.sum(),
                "paged_attention": ours,
                "gather_sdpa": lambda: gather_then_sdpa(q, kc, vc, table, seq_lens, scale)}
    if flex:
        variants["flex_paged"] = flex_paged_setup(kc, vc, table, q, scale)
    # Sanity: the variants compute the same thing.
    want = gather_then_sdpa(q, kc, vc, table, seq_lens, scale).squeeze(2).float()
    torch.testing.assert_close(ours().float(), want, atol=3e-2, rtol=0)
    t = interleaved(variants, rounds)
    copy_gbps = 2 * kv_bytes / t["copy"] / 1e9
    read_gbps = kv_bytes / t["read"] / 1e9
    attn_gbps = kv_bytes / t["paged_attention"] / 1e9
    out = {
        "dtype": str(dtype).replace("torch.", ""),
        "copy_GBps": round(copy_gbps, 2),
        "read_GBps": round(read_gbps, 2),
        "decode_ms": round(t["paged_attention"] * 1e3, 2),
        "decode_GBps": round(attn_gbps, 2),
        "decode_vs_read": round(attn_gbps / read_gbps, 3),
        "decode_vs_copy": round(attn_gbps / copy_gbps, 3),
        "speedup_vs_gather_sdpa": round(t["gather_sdpa"] / t["paged_attention"], 2),
    }
    if flex:
        out["speedup_vs_flex_paged"] = round(t["flex_paged"] / t["paged_attention"], 2)
    return out


def bench_write(dtype, rounds, gen, cache_dtype=None):
    tokens = 4096
    cache_dtype = cache_dtype or dtype
    kc = torch.zeros(tokens * 2 // BLOCK, BLOCK, KV_HEADS, HEAD, dtype=cache_dtype)
    vc = torch.zeros_like(kc)
    key = torch.randn(tokens, KV_HEADS, HEAD, generator=gen).to(dtype)
    value = torch.randn(tokens, KV_HEADS, HEAD, generator=gen).to(dtype)
    slots = torch.randperm(kc.shape[0] * BLOCK, generator=gen)[:tokens]
    scale = torch.tensor([0.5])
    moved = 2 * key.numel() * (key.element_size() + kc.element_size())  # read input, write cache
    src = torch.randn(moved // 2 // 4, generator=gen)
    dst = torch.empty_like(src)
    t = interleaved({"copy": lambda: dst.copy_(src),
                     "write": lambda: pk.reshape_and_cache(key, value, kc, vc, slots, scale, scale)},
                    rounds)
    copy_gbps = 2 * src.numel() * 4 / t["copy"] / 1e9
    gbps = moved / t["write"] / 1e9
    return {"dtype": f"{dtype}->{cache_dtype}".replace("torch.", ""), "GBps": round(gbps, 2),
            "vs_copy": round(gbps / copy_gbps, 3)}


def bench_prefill(dtype, rounds, gen, prefix=2048, new=2048):
    """`new` tokens of one sequence over a `prefix`-token cached prefix (chunked prefill;
    prefix 0: a plain prefill), against PyTorch's SDPA on the same K/V laid out
    contiguously with the same causal mask (bottom-right aligned)."""
    from torch.nn.attention.bias import causal_lower_right

    blocks = (prefix + new) // BLOCK
    kc = torch.randn(blocks, BLOCK, KV_HEADS, HEAD, generator=gen).to(dtype)
    vc = torch.randn(blocks, BLOCK, KV_HEADS, HEAD, generator=gen).to(dtype)
    table = torch.randperm(blocks, generator=gen).int().view(1, -1)
    q = torch.randn(new, HEADS, HEAD, generator=gen).to(dtype)
    seq_lens = torch.tensor([prefix + new], dtype=torch.int32)
    qsl = torch.tensor([0, new], dtype=torch.int32)
    k = kc[table[0].long()].reshape(1, -1, KV_HEADS, HEAD).transpose(1, 2).contiguous()
    v = vc[table[0].long()].reshape(1, -1, KV_HEADS, HEAD).transpose(1, 2).contiguous()
    qd = q.view(1, new, HEADS, HEAD).transpose(1, 2).contiguous()
    mask = causal_lower_right(new, prefix + new) if prefix else None

    def sdpa():
        if mask is None:
            return F.scaled_dot_product_attention(qd, k, v, is_causal=True, scale=0.1,
                                                  enable_gqa=True)
        return F.scaled_dot_product_attention(qd, k, v, attn_mask=mask, scale=0.1,
                                              enable_gqa=True)

    t = interleaved({"prefill": lambda: pk.paged_attention(q, kc, vc, table, seq_lens, qsl, 0.1),
                     "sdpa": sdpa}, max(2, rounds // 3))
    return {"dtype": str(dtype).replace("torch.", ""), "prefix": prefix, "new": new,
            "tokens_per_s": round(new / t["prefill"]), "ms": round(t["prefill"] * 1e3, 1),
            "sdpa_tokens_per_s": round(new / t["sdpa"]),
            "vs_sdpa": round(t["sdpa"] / t["prefill"], 3)}


BUSY_LOOP = "import time, sys\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end: pass"


def bench_tiny_decode(dtype, gen, calls=2000, busy_s=20.0):
    """A decode of batch 1 x context 16, mean time per call (a stalled call counts), on an
    idle machine and while a spinning process (bounded to busy_s seconds) keeps one of the
    cores busy."""
    kc = torch.randn(1, BLOCK, KV_HEADS, HEAD, generator=gen).to(dtype)
    vc = torch.randn_like(kc)
    table = torch.zeros(1, 1, dtype=torch.int32)
    seq_lens = torch.tensor([BLOCK], dtype=torch.int32)
    qsl = torch.tensor([0, 1], dtype=torch.int32)
    q = torch.randn(1, HEADS, HEAD, generator=gen).to(dtype)

    def per_call_us():
        t = time.perf_counter()
        for _ in range(calls):
            pk.paged_attention(q, kc, vc, table, seq_lens, qsl, 0.1)
        return (time.perf_counter() - t) / calls * 1e6

    per_call_us()  # warm up
    idle = per_call_us()
    spinner = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(busy_s)])
    try:
        time.sleep(0.2)
        busy = per_call_us()
    finally:
        spinner.kill()
        spinner.wait()
    return {"dtype": str(dtype).replace("torch.", ""), "idle_us": round(idle, 1),
            "busy_us": round(busy, 1), "busy_vs_idle": round(busy / idle, 2)}


def table(result) -> str:
    lines = [
        f"{machine.line(result['threads'])}\n\n"
        f"Decode: batch {BATCH}, context {CONTEXT}, {HEADS}/{KV_HEADS} heads, head {HEAD}, "
        f"block {BLOCK}; {result['threads']} threads",
        "",
        "| dtype | copy GB/s (r+w) | read GB/s | decode ms | decode GB/s | vs read | vs copy | "
        "vs gather+SDPA | vs FlexAttention paged |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d in result["decode"]:
        lines.append(f"| {d['dtype']} | {d['copy_GBps']} | {d['read_GBps']} | {d['decode_ms']} | "
                     f"{d['decode_GBps']} | {d['decode_vs_read']:.0%} | "
                     f"{d['decode_vs_copy']:.0%} | {d['speedup_vs_gather_sdpa']}x | "
                     f"{d.get('speedup_vs_flex_paged', '-')}x |")
    lines += ["", "| reshape_and_cache | GB/s (read + write) | vs copy |", "|---|---|---|"]
    for w in result["write"]:
        lines.append(f"| {w['dtype']} | {w['GBps']} | {w['vs_copy']:.0%} |")
    lines += ["", "| prefill (one sequence) | tokens/s | ms | SDPA tokens/s | vs SDPA |",
              "|---|---|---|---|---|"]
    for p in result["prefill"]:
        lines.append(f"| {p['dtype']}, {p['new']} new over {p['prefix']} cached | "
                     f"{p['tokens_per_s']} | {p['ms']} | {p['sdpa_tokens_per_s']} | "
                     f"{p['vs_sdpa']}x |")
    lines += ["", "| tiny decode, batch 1 x context 16 | idle us | one core busy us | busy/idle |",
              "|---|---|---|---|"]
    for r in result["tiny"]:
        lines.append(f"| {r['dtype']} | {r['idle_us']} | {r['busy_us']} | {r['busy_vs_idle']}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (slow to compile)")
    ap.add_argument("--only", default="decode,write,prefill,tiny",
                    help="comma-separated parts to run (default: all)")
    ap.add_argument("--write-results", action="store_true",
                    help="write the table to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    parts = {
        "decode": lambda: [bench_decode(dt, args.rounds, not args.no_flex, gen)
                           for dt in (torch.bfloat16, torch.float32)],
        "write": lambda: [bench_write(torch.bfloat16, args.rounds, gen),
                          bench_write(torch.float32, args.rounds, gen),
                          bench_write(torch.bfloat16, args.rounds, gen, torch.float8_e4m3fn)],
        "prefill": lambda: [bench_prefill(dt, args.rounds, gen, prefix)
                            for dt in (torch.bfloat16, torch.float32) for prefix in (2048, 0)],
        "tiny": lambda: [bench_tiny_decode(dt, gen) for dt in (torch.bfloat16, torch.float32)],
    }
    only = args.only.split(",")
    threads = torch.get_num_threads()
    result = {"threads": threads, "machine": machine.as_dict(threads)}
    if not args.json:
        print(machine.line(threads), flush=True)
    result.update({name: run() if name in only else [] for name, run in parts.items()})
    if args.json:
        print(json.dumps(result))
    else:
        print(table(result))
    if args.write_results:
        cmd = "python -m benchmarks.bench_ops " + " ".join(argv if argv is not None else sys.argv[1:])
        write_section("Ops (CPU)", f"Command: `{cmd.strip()}`\n\n{table(result)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
