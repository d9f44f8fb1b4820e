"""`pagedkv trace`: one request through the engine, step by step, from real engine state.

The seed's "cache lifecycle in request flow", but measured: every line below is read
from the BlockManager, the step's planned metadata tensors, or the KV cache itself
after the step ran.
"""
from __future__ import annotations

import argparse
import random
import sys

import torch

from ..models.llama import LlamaConfig, TinyLlama
from ..engine.llm import LLM
from ..engine.sampling import SamplingParams

TRACE_CONFIG = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                           num_layers=2, num_heads=4, num_kv_heads=2, head_size=32, seed=0)


def _ranges(offsets: list[int]) -> str:
    if len(offsets) == 1:
        return str(offsets[0])
    return f"{offsets[0]}-{offsets[-1]}" if offsets == list(range(offsets[0], offsets[-1] + 1)) \
        else ",".join(map(str, offsets))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pagedkv trace", description=__doc__)
    p.add_argument("--prompt-tokens", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=14)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=8)
    p.add_argument("--compile", action="store_true", help="run the model compiled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="every step in full")
    args = p.parse_args(argv)

    model = TinyLlama(TRACE_CONFIG)
    llm = LLM(model, num_blocks=args.num_blocks, block_size=args.block_size,
              compile=args.compile)
    bm, runner, kv = llm.block_manager, llm.runner, llm.kv_cache
    bs = args.block_size
    rng = random.Random(args.seed)
    prompt = [rng.randrange(TRACE_CONFIG.vocab_size) for _ in range(args.prompt_tokens)]
    req = llm.add_request(prompt, SamplingParams(max_tokens=args.max_tokens))
    seq = req.sequences[0]
    print(f"engine: tiny Llama ({TRACE_CONFIG.num_layers} layers), KV cache of {kv.num_blocks} "
          f"blocks x {bs} tokens, {'compiled' if args.compile else 'eager'}")
    print(f"request {req.request_id} arrives: prompt of {len(prompt)} tokens {prompt}, "
          f"max_tokens={args.max_tokens}; free blocks {bm.num_free_blocks}/{bm.num_blocks}")

    step_no = 0
    prev_table: list[int] = []
    key_cache = kv.key_caches[0]
    while llm.has_unfinished():
        step_no += 1
        before = key_cache.clone()  # to show which cache rows the step wrote
        out = llm.step()
        sch = out.scheduled.scheduled[0]
        plan = runner.last_metadata
        n_tok, n_seq = plan.num_tokens, plan.num_seqs
        slots = plan.slot_mapping[:n_tok].tolist()
        pad = plan.slot_mapping.shape[0] - n_tok
        seq_lens = plan.seq_lens[:n_seq].tolist()
        qsl = plan.query_start_loc[:n_seq + 1].tolist()
        table = plan.block_table[0, :-(-seq_lens[0] // bs)].tolist()
        kind = "decode" if sch.is_decode else "prefill"
        written = (key_cache != before).flatten(2).any(-1)  # [block, offset] rows that changed
        rows = [tuple(r) for r in written.nonzero().tolist()]
        expect = {(s // bs, s % bs) for s in slots}
        ok = "= slot_mapping" if set(rows) == expect else "!= slot_mapping (BUG)"
        crossed = step_no > 1 and len(table) > len(prev_table)
        finished = seq.finish_reason is not None
        token = f"sampled {out.tokens[0]}" if out.tokens else "no token sampled"
        if not (step_no <= 2 or crossed or finished or args.verbose):
            s0 = slots[0]
            print(f"step {step_no}: {kind} position {sch.num_computed} -> slot {s0} (block "
                  f"{s0 // bs}, offset {s0 % bs}), written {ok}; attention context "
                  f"{seq_lens[0]}; {token}")
            prev_table = table
            continue
        print(f"step {step_no}: {kind}, {sch.num_new} new token(s) at positions "
              f"{sch.num_computed}-{sch.num_computed + sch.num_new - 1}")
        if step_no == 1:
            print(f"  scheduler admits seq {seq.seq_id}; BlockManager.allocate -> blocks {table} "
                  f"({req.metrics.num_cached_tokens} prompt tokens reused from the prefix cache)")
        elif crossed:
            print(f"  BLOCK BOUNDARY: position {sch.num_computed} is offset 0 of a new block; "
                  f"BlockManager.append took block {table[-1]}")
        else:
            print(f"  position {sch.num_computed} fits block {table[-1]} "
                  f"(offset {sch.num_computed % bs}): no new block")
        print(f"  block_table = {table}")
        pad_note = f"  (+{pad} padding slot(s) = -1, skipped)" if pad else ""
        print(f"  slot_mapping = {slots}{pad_note}")
        by_block: dict[int, list[int]] = {}
        for b, o in rows:
            by_block.setdefault(b, []).append(o)
        desc = ", ".join(f"block {b} offsets {_ranges(o)}" for b, o in by_block.items())
        print(f"  reshape_and_cache wrote layer-0 key_cache at {desc} {ok}")
        print(f"  paged_attention reads context length seq_lens = {seq_lens}, "
              f"query_start_loc = {qsl}, through block_table {table}")
        print(f"  {token}: the sequence has {len(seq.token_ids)} tokens, "
              f"{seq.num_computed_tokens} with K/V in the cache")
        print(f"  BlockManager.commit({seq.seq_id}, {seq.num_computed_tokens}): "
              f"{seq.num_computed_tokens // bs} full block(s) reusable as prefix cache")
        if not finished:
            print(f"  free blocks {bm.num_free_blocks}/{bm.num_blocks}")
        prev_table = table

    print(f"\nrequest {req.request_id} finished ({seq.finish_reason}): "
          f"{len(seq.output_token_ids)} tokens {seq.output_token_ids}")
    print(f"  time to first token {req.metrics.time_to_first_token * 1e3:.1f} ms, "
          f"latency {req.metrics.latency * 1e3:.1f} ms, preemptions {req.metrics.num_preemptions}")
    print(f"  the scheduler finished it in the last step: BlockManager.free({seq.seq_id}) "
          f"released blocks {prev_table}; free blocks {bm.num_free_blocks}/{bm.num_blocks}")
    kept = seq.num_computed_tokens // bs
    print(f"  its {kept} committed full block(s) {prev_table[:kept]} stay in the prefix cache, "
          f"free but reusable by the next request with the same prefix, until evicted (LRU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
