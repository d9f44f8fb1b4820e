"""`pagedkv showcase`: the four ops on random data, each checked against the reference,
with a small timing table (for the full benchmark run `make bench`)."""
from __future__ import annotations

import argparse
import math
import time

import torch

from . import ops, reference


def _ms(fn, repeat: int = 5) -> float:
    fn()
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pagedkv showcase", description=__doc__)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=1024)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, head, block = 32, 8, 128, 16
    blocks_per_seq = -(-args.context // block)
    num_blocks = args.batch * blocks_per_seq + 4
    kc = torch.randn(num_blocks, block, kv_heads, head, generator=g).to(dtype)
    vc = torch.randn_like(kc, dtype=torch.float32).to(dtype)
    table = torch.randperm(num_blocks, generator=g)[: args.batch * blocks_per_seq].int()
    table = table.view(args.batch, blocks_per_seq)
    seq_lens = torch.full((args.batch,), args.context, dtype=torch.int32)
    qsl = torch.arange(args.batch + 1, dtype=torch.int32)
    q = torch.randn(args.batch, heads, head, generator=g).to(dtype)
    # The decode step's new tokens: the last position of each sequence.
    last = args.context - 1
    slots = (table[:, last // block].long() * block + last % block)
    k_new = torch.randn(args.batch, kv_heads, head, generator=g).to(dtype)
    v_new = torch.randn(args.batch, kv_heads, head, generator=g).to(dtype)
    scale = 1.0 / math.sqrt(head)

    rows = []
    ref_k, ref_v = kc.clone(), vc.clone()
    reference.reshape_and_cache(k_new, v_new, ref_k, ref_v, slots)
    t = _ms(lambda: ops.reshape_and_cache(k_new, v_new, kc, vc, slots))
    rows.append(("reshape_and_cache", f"{args.batch} tokens", torch.equal(kc, ref_k) and torch.equal(vc, ref_v), t))

    out = ops.paged_attention(q, kc, vc, table, seq_lens, qsl, scale)
    want = reference.paged_attention(q, kc, vc, table, seq_lens, qsl, scale)
    ok = torch.allclose(out.float(), want.float(), atol=2e-2)
    t = _ms(lambda: ops.paged_attention(q, kc, vc, table, seq_lens, qsl, scale))
    gbps = 2 * kc[table.long()].numel() * kc.element_size() / (t / 1e3) / 1e9
    rows.append(("paged_attention", f"decode {args.batch}x{args.context}, {gbps:.1f} GB/s", ok, t))

    mapping = torch.tensor([[int(table[0, 0]), int(table[-1, -1])]])
    ref_k = kc.clone()
    reference.copy_blocks([ref_k], [ref_k.clone()], mapping)
    t = _ms(lambda: ops.copy_blocks([kc], [vc], mapping))
    rows.append(("copy_blocks", "1 block x 2 caches", torch.equal(kc, ref_k), t))

    host = torch.empty_like(kc[:4])
    swap = torch.tensor([[int(table[0, i]), i] for i in range(min(4, blocks_per_seq))])
    t = _ms(lambda: ops.swap_blocks(kc, host, swap))
    rows.append(("swap_blocks", f"{len(swap)} blocks", torch.equal(host[: len(swap)], kc[swap[:, 0]]), t))

    print(f"torch_pagedkv ops on random {args.dtype} data ({torch.get_num_threads()} threads)\n")
    print(f"| {'op':<18} | {'case':<34} | matches reference | {'ms':>8} |")
    print(f"|{'-' * 20}|{'-' * 36}|-------------------|{'-' * 10}|")
    for name, case, ok, ms in rows:
        print(f"| {name:<18} | {case:<34} | {'yes' if ok else 'NO':<17} | {ms:8.3f} |")
    return 0 if all(r[2] for r in rows) else 1
