"""Tensor-parallel generation: the same script on every rank.

    # N processes started by torchrun (gloo on CPU, NCCL with one GPU per rank; for
    # several machines add --nnodes and --rdzv-endpoint, the script does not change)
    .venv/bin/python -m torch.distributed.run --nproc-per-node 2 -m examples.tp_generate
    # one process that spawns its N - 1 workers itself
    .venv/bin/python -m examples.tp_generate --spawn 2
    # a local Hugging Face checkpoint instead of the tiny random Llama
    ... -m examples.tp_generate --model path/to/checkpoint

Every rank calls LLM(model, tensor_parallel_size=N) with the same arguments: rank 0
gets an engine that generates, the other ranks serve rank 0's steps inside that call and
return when rank 0 shuts down (llm.is_driver tells them apart). Rank 0 then prints the
tokens and, for the tiny model, the one-process engine's tokens beside them.
"""
from __future__ import annotations

import argparse
import functools
import os

import torch

from torch_pagedkv.engine import LLM, SamplingParams
from torch_pagedkv.models import LlamaConfig, TinyLlama

TINY = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_size=32, max_position=1024, seed=1)
PROMPTS = [[1, 17, 42, 99, 7, 300], [1, 17, 42, 99, 8], [256, 3, 3, 3]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a local Hugging Face checkpoint directory "
                                        "(default: a tiny random Llama)")
    parser.add_argument("--spawn", type=int, default=None, metavar="N",
                        help="without torchrun: ranks to spawn from this process")
    parser.add_argument("--max-tokens", type=int, default=12)
    args = parser.parse_args()
    world = args.spawn or int(os.environ.get("WORLD_SIZE", 1))
    model = args.model or functools.partial(TinyLlama, TINY)
    prompts = ["Paged attention is", "Tensor parallelism splits"] if args.model else PROMPTS
    params = SamplingParams(max_tokens=args.max_tokens)
    with LLM(model, tensor_parallel_size=world, num_blocks=64, compile=False) as llm:
        if not llm.is_driver:
            return  # this rank served rank 0's steps until it shut down
        outs = llm.generate(prompts, params, use_tqdm=False)
    for out in outs:
        print(f"rank 0 of {world}: {out.token_ids}" + (f" {out.text!r}" if out.text else ""))
    if not args.model:
        ref = LLM(TinyLlama(TINY), num_blocks=64, compile=False).generate(
            prompts, params, use_tqdm=False)
        same = [o.token_ids for o in outs] == [o.token_ids for o in ref]
        print(f"one process gives the same tokens: {same}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
