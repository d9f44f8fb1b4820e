"""Hugging Face model throughput: HF's own generate (sdpa) vs torch_pagedkv on the same model.

    python -m benchmarks.bench_hf [--json] [--num-prompts 8] [--prompt-len 256]
                                  [--shared-len 224] [--new-tokens 64] [--repeats 3]
                                  [--no-compile]

One tiny random Llama (transformers LlamaConfig, built locally; nothing is
downloaded), one set of prompts, greedy decoding, output tokens per second:
  hf-sdpa        model.generate() with attn_implementation="sdpa", the batch at once
                 (DynamicCache: every prompt token is computed, shared or not);
  hf-pagedkv     the same generate() with attn_implementation="pagedkv" and a PagedCache
                 (HF's generate loop, our kernels and paged K/V);
  engine         torch_pagedkv.engine.LLM(model): continuous batching and prefix
                 caching, model in eager mode;
  engine-compiled the same under torch.compile (inductor), compile time excluded.
Two workloads: "unique" (random prompts) and "shared-prefix" (every prompt starts with
the same --shared-len tokens, a system prompt, then its own tokens). Each runner is
warmed up on other prompts of the same workload (same shared prefix, other suffixes),
so a prefix cache holds the system prompt, as it would in a server, and nothing else.
Then --repeats timed rounds, each on fresh prompts (so only the shared prefix is ever
cached); the best round is reported. Every runner's tokens are checked against
hf-sdpa's in every round; prefix_hit_tokens is the last round's.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

import torch_pagedkv.integrations.hf as pagedkv_hf  # noqa: E402
from benchmarks import machine  # noqa: E402
from torch_pagedkv.engine import LLM, SamplingParams  # noqa: E402

VOCAB = 4096
BLOCK_SIZE = 16


def build_model() -> torch.nn.Module:
    """The engine's demo size (models/llama.py LlamaConfig defaults), as an HF Llama."""
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=768,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=64, max_position_embeddings=2048, initializer_range=0.1,
                      pad_token_id=0, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def make_prompts(n: int, length: int, shared: int, seed: int,
                 prefix: list[int]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [prefix[:shared] + torch.randint(1, VOCAB, (length - shared,), generator=gen).tolist()
            for _ in range(n)]


def hf_generate(model, prompts, new_tokens: int, paged: bool) -> list[list[int]]:
    ids = torch.tensor(prompts)  # equal lengths: no padding
    kwargs = {}
    if paged:
        kwargs["past_key_values"] = pagedkv_hf.PagedCache.for_model(
            model, max_batch_size=len(prompts), max_seq_len=ids.shape[1] + new_tokens,
            block_size=BLOCK_SIZE)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, **kwargs)
    return out[:, ids.shape[1]:].tolist()


def make_runner(name: str, model, new_tokens: int):
    """A function prompts -> (generated tokens, prefix-cache hit tokens or None)."""
    if name.startswith("hf"):
        paged = name == "hf-pagedkv"

        def generate(prompts):
            model.set_attn_implementation("pagedkv" if paged else "sdpa")
            return hf_generate(model, prompts, new_tokens, paged), None
        return generate
    llm = LLM(model, num_blocks=1024, block_size=BLOCK_SIZE, enable_prefix_caching=True,
              compile=name == "engine-compiled")  # one engine: compiled once, cache kept
    params = SamplingParams(max_tokens=new_tokens)

    def generate(prompts):
        model.set_attn_implementation("pagedkv")
        before = llm.block_manager.stats.hits
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], llm.block_manager.stats.hits - before
    return generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--shared-len", type=int, default=224)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds; best is reported")
    ap.add_argument("--no-compile", action="store_true", help="skip engine-compiled")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model()
    system = torch.randint(1, VOCAB, (args.prompt_len,),
                           generator=torch.Generator().manual_seed(123)).tolist()
    runners = ["hf-sdpa", "hf-pagedkv", "engine"] + ([] if args.no_compile else
                                                       ["engine-compiled"])
    results = []
    for workload, shared in (("unique", 0), ("shared-prefix", args.shared_len)):
        warmup = make_prompts(args.num_prompts, args.prompt_len, shared, 1, system)
        rounds = [make_prompts(args.num_prompts, args.prompt_len, shared, 2 + r, system)
                  for r in range(args.repeats)]  # fresh prompts: only the prefix is cached
        best = {name: float("inf") for name in runners}
        hits = {name: None for name in runners}
        match = {name: True for name in runners}
        generate = {name: make_runner(name, model, args.new_tokens) for name in runners}
        for name in runners:
            generate[name](warmup)  # compiles, fills the prefix cache with the system prompt
        for prompts in rounds:
            ref = None
            for name in runners:
                t0 = time.perf_counter()
                tokens, h = generate[name](prompts)
                best[name] = min(best[name], time.perf_counter() - t0)
                ref = tokens if ref is None else ref
                match[name] &= tokens == ref
                hits[name] = h
        n = args.num_prompts * args.new_tokens
        for name in runners:
            results.append({"workload": workload, "runner": name,
                            "tokens_per_s": round(n / best[name], 1),
                            "seconds": round(best[name], 3), "prefix_hit_tokens": hits[name],
                            "tokens_match_hf_sdpa": match[name]})
        model.set_attn_implementation("sdpa")
    report = {
        "model": "LlamaConfig(hidden 256, 4 layers, 4 heads / 2 kv heads, head_dim 64, "
                 f"vocab {VOCAB}), float32, random init",
        "workload": {"num_prompts": args.num_prompts, "prompt_len": args.prompt_len,
                     "shared_len": args.shared_len, "new_tokens": args.new_tokens,
                     "block_size": BLOCK_SIZE, "repeats": args.repeats},
        "machine": {**machine.as_dict(torch.get_num_threads()),
                    "transformers": transformers.__version__},
        "results": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(machine.line(torch.get_num_threads()))
    print(f"{report['model']}; {args.num_prompts} prompts x {args.prompt_len} tokens "
          f"(shared prefix {args.shared_len}), {args.new_tokens} new tokens each")
    print(f"{'workload':<14} {'runner':<16} {'tok/s':>8} {'seconds':>8} {'hits':>6}  match")
    for r in results:
        hits = "-" if r["prefix_hit_tokens"] is None else r["prefix_hit_tokens"]
        print(f"{r['workload']:<14} {r['runner']:<16} {r['tokens_per_s']:>8} "
              f"{r['seconds']:>8} {hits:>6}  {r['tokens_match_hf_sdpa']}")


if __name__ == "__main__":
    main()
