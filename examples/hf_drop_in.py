"""A Hugging Face transformers model on the pagedkv kernels, its code unchanged.

Builds a tiny random model locally (nothing is downloaded), then generates greedily
three ways and prints the tokens side by side:
  eager    transformers' own eager attention (the reference);
  pagedkv  the same model and HF's own generate(), attention on reshape_and_cache +
           paged_attention with K/V in a PagedCache (blocks from our BlockManager);
  engine   torch_pagedkv.engine.LLM(model): continuous batching, prefix caching.
The prompts are a left-padded batch with its attention_mask, so padding is honoured.

    .venv/bin/python -m examples.hf_drop_in [--model llama|mistral|gemma2|qwen2] [--new-tokens 24]
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a random config: never touch a hub

import torch  # noqa: E402
from transformers import (AutoModelForCausalLM, Gemma2Config, LlamaConfig,  # noqa: E402
                          MistralConfig, Qwen2Config)

import torch_pagedkv.integrations.hf as pagedkv_hf  # noqa: E402  (registers "pagedkv")

COMMON = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              max_position_embeddings=512, initializer_range=0.1, pad_token_id=0,
              bos_token_id=None, eos_token_id=None)
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2),
    "mistral": lambda: MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=1,
                                     sliding_window=32),
    "gemma2": lambda: Gemma2Config(**COMMON, num_attention_heads=2, num_key_value_heads=1,
                                   head_dim=128, sliding_window=16, attn_logit_softcapping=5.0,
                                   tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(CONFIGS), default="llama")
    ap.add_argument("--new-tokens", type=int, default=24)
    args = ap.parse_args()

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[args.model](),
                                             attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 512, (n,), generator=gen).tolist() for n in (12, 45, 30)]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    greedy = dict(max_new_tokens=args.new_tokens, do_sample=False)

    with torch.no_grad():
        eager = model.generate(ids, attention_mask=mask, **greedy)[:, width:].tolist()
        model.set_attn_implementation("pagedkv")  # same weights, our kernels
        cache = pagedkv_hf.PagedCache.for_model(model, max_batch_size=len(prompts),
                                                max_seq_len=width + args.new_tokens)
        paged = model.generate(ids, attention_mask=mask, past_key_values=cache,
                               **greedy)[:, width:].tolist()
    print(f"{args.model}: {len(prompts)} left-padded prompts of {[len(p) for p in prompts]} "
          f"tokens, {args.new_tokens} greedy tokens each; PagedCache used "
          f"{cache.block_manager.num_blocks - cache.num_free_blocks} blocks of {cache.block_size}")
    runs = {"eager": eager, "pagedkv": paged}
    try:
        from torch_pagedkv.engine import LLM, SamplingParams
    except ImportError:
        print("(torch_pagedkv.engine not available: engine run skipped)")
    else:
        llm = LLM(model, num_blocks=64, block_size=16, compile=False)  # True: torch.compile
        outs = llm.generate(prompts, SamplingParams(max_tokens=args.new_tokens), use_tqdm=False)
        runs["engine"] = [o.outputs[0].token_ids for o in outs]
    for i in range(len(prompts)):
        for name, toks in runs.items():
            print(f"  prompt {i} {name:>8}: {toks[i]}")
    agree = True
    for name, toks in runs.items():
        if name != "eager":
            same = sum(a == b for a, b in zip(toks, eager))
            print(f"{name} vs eager: {same}/{len(prompts)} prompts token-identical")
            agree &= same == len(prompts)
    sys.exit(0 if agree else 1)


if __name__ == "__main__":
    main()
