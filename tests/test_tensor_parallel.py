"""Tensor parallelism: LLM(model, tensor_parallel_size=2) on CPU with gloo, two ranks.

Specification: the engine split across two processes (heads and MLP columns sharded,
each rank caching its own KV heads) generates the tokens of the one-process engine
for TinyLlama (KV heads split) and for a Hugging Face Llama loaded from a checkpoint
directory (one KV head: replicated), through prefix caching, chunked prefill,
preemption (swap and recompute), copy-on-write forks and cascade attention; bad
arguments are refused before anything starts; a killed worker makes the next call
raise a RuntimeError naming its rank, and no worker process outlives the engine.

The row-parallel all-reduce sums in another order than one matmul, so logits differ in
the last bits: the models are random with init_std/initializer_range large enough that
greedy ties do not occur on these prompts (the N=1 reference is checked for variety).
Each LLM(..., tensor_parallel_size=2) starts a process that imports torch: few of them.
"""
import functools
import multiprocessing
import os
import signal
import subprocess
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from torch_pagedkv.distributed import Shard, TensorParallelModelError
from torch_pagedkv.engine import LLM, SamplingParams
from torch_pagedkv.models import LlamaConfig, TinyLlama

CFG = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_size=16, max_position=1024, seed=3)
BUILD = functools.partial(TinyLlama, CFG)
BLOCK = 8


def prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    """Two families sharing a 3-block prefix, and one of its own."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.randint(1, vocab, (3 * BLOCK + 2,), generator=gen).tolist()
    tails = [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in (5, 19, 9, 30)]
    return [head + tails[0], head + tails[1], head + tails[2], tails[3]]


def token_ids(outputs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outputs]


def workers_alive() -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith("pagedkv-tp")]


def child_pids() -> set[int]:
    """Every child process of this one, of any kind (Linux /proc)."""
    kids = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid():
            kids.add(int(entry))
    return kids


# A small cache (preemption), chunks of 16 tokens, a fork with copy-on-write (n=2,
# seeded sampling: rank 0 samples), shared prefixes as cascade attention.
TINY_ARGS = dict(num_blocks=20, block_size=BLOCK, max_num_batched_tokens=16, compile=False,
                 enable_prefix_caching=True, enable_cascade=True, preemption_mode="swap")
TINY_PARAMS = [SamplingParams(max_tokens=14)] * 3 + [
    SamplingParams(max_tokens=14, n=2, temperature=0.8, seed=5)]


def test_tiny_llama_two_ranks_generate_the_one_rank_tokens():
    p = prompts(CFG.vocab_size)
    ref_llm = LLM(BUILD(), **TINY_ARGS)
    want = token_ids(ref_llm.generate(p, TINY_PARAMS, use_tqdm=False))
    assert len({t for w in want for s in w for t in s}) > 20, "degenerate reference"
    before = child_pids()
    with LLM(BUILD, tensor_parallel_size=2, **TINY_ARGS) as llm:
        assert llm.kv_cache.num_kv_heads == 1 and llm.is_driver  # its own KV head
        got = token_ids(llm.generate(p, TINY_PARAMS, use_tqdm=False))
        again = token_ids(llm.generate(p, TINY_PARAMS, use_tqdm=False))  # prefix cache hits
        st = llm.stats
        assert st.num_swapped_out > 0 and st.num_cow_copies > 0 and st.num_cascade_steps > 0
        assert st.prefix_hits > 0
        pids = [p.pid for p in workers_alive()]
        assert len(pids) == 1
        with pytest.raises(RuntimeError, match="already runs a tensor-parallel engine"):
            LLM(BUILD, tensor_parallel_size=2, **TINY_ARGS)  # one default group per process
    assert got == want and again == want
    assert workers_alive() == []  # the context manager stopped the worker
    assert child_pids() <= before  # and no other process it started is left
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate(p[:1], use_tqdm=False)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A tiny HF Llama with one KV head (replicated on both ranks), saved to a dir."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32,
        max_position_embeddings=256, initializer_range=0.3, pad_token_id=0,
        bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    path = tmp_path_factory.mktemp("tp_ckpt")
    model.save_pretrained(path)
    return path


def test_hf_llama_checkpoint_two_ranks_generate_the_one_rank_tokens(hf_checkpoint):
    args = dict(num_blocks=14, block_size=BLOCK, max_num_batched_tokens=16, compile=False)
    p = prompts(384, seed=1)
    params = SamplingParams(max_tokens=16)
    ref = LLM(str(hf_checkpoint), **args)
    want = token_ids(ref.generate(p, params, use_tqdm=False))
    assert ref.stats.num_preemptions > 0  # recompute under cache pressure
    assert len({t for w in want for s in w for t in s}) > 20, "degenerate reference"
    llm = LLM(str(hf_checkpoint), tensor_parallel_size=2, **args)
    try:
        assert llm.kv_cache.num_kv_heads == 1
        assert type(llm.model.hf_model.lm_head).__name__ == "VocabParallelLinear"
        assert token_ids(llm.generate(p, params, use_tqdm=False)) == want
        assert llm.stats.num_preemptions > 0 and llm.stats.prefix_hits > 0
    finally:
        llm.shutdown()
    assert workers_alive() == []


def test_a_checkpoint_is_checked_before_its_weights_are_read(hf_checkpoint, monkeypatch):
    import transformers
    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the sizes were checked")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    with pytest.raises(ValueError, match="tensor_parallel_size=3 must divide the model's 4"):
        LLM(str(hf_checkpoint), tensor_parallel_size=3)


def build_hf(family: str):
    """A tiny random HF model of `family` (a module-level builder: workers import it)."""
    import transformers as T
    common = dict(vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=0.3, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    configs = {"mistral": lambda: T.MistralConfig(**common, sliding_window=16),  # window
               "qwen2": lambda: T.Qwen2Config(**common)}  # q/k/v biases
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(configs[family]())
    with torch.no_grad():  # Qwen2 zeroes its biases at init: make them matter
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_hf_builders_two_ranks_generate_the_one_rank_tokens(family):
    pytest.importorskip("transformers")
    build = functools.partial(build_hf, family)
    args = dict(num_blocks=32, block_size=BLOCK, max_num_batched_tokens=16, compile=False)
    p, params = prompts(384, seed=2), SamplingParams(max_tokens=20)
    want = token_ids(LLM(build, **args).generate(p, params, use_tqdm=False))
    assert len({t for w in want for s in w for t in s}) > 20, "degenerate reference"
    with LLM(build, tensor_parallel_size=2, **args) as llm:
        assert token_ids(llm.generate(p, params, use_tqdm=False)) == want


def test_a_killed_worker_is_named_by_the_next_call_and_nothing_is_left():
    before = child_pids()
    llm = LLM(BUILD, tensor_parallel_size=2, num_blocks=32, block_size=BLOCK, compile=False)
    p = prompts(CFG.vocab_size)
    llm.generate(p[:2], SamplingParams(max_tokens=4), use_tqdm=False)
    (worker,) = workers_alive()
    os.kill(worker.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 \(pid \d+\)"):
        llm.generate(p, SamplingParams(max_tokens=4), use_tqdm=False)
    assert time.monotonic() - start < 60
    assert workers_alive() == [] and child_pids() <= before
    with pytest.raises(RuntimeError, match="rank 1"):  # and every later call too
        llm.generate(p, SamplingParams(max_tokens=4), use_tqdm=False)
    llm.shutdown()  # harmless after a failure


def build_only_in_rank0() -> TinyLlama:
    if multiprocessing.parent_process() is not None:  # a spawned worker
        raise RuntimeError("this worker cannot build its model")
    return TinyLlama(CFG)


def test_a_worker_that_fails_to_start_is_named():
    before = child_pids()
    with pytest.raises(RuntimeError, match=r"rank 1 \(pid \d+\) exited with code 1 while "
                                           "starting"):
        LLM(build_only_in_rank0, tensor_parallel_size=2, num_blocks=8, compile=False)
    assert child_pids() <= before


# ---------------------------------------------------------------- refused up front
def test_a_model_instance_is_refused_with_what_to_pass():
    with pytest.raises(TensorParallelModelError, match="path .* or a builder"):
        LLM(TinyLlama(CFG), tensor_parallel_size=2)
    with pytest.raises(TypeError, match="picklable"):
        LLM(lambda: TinyLlama(CFG), tensor_parallel_size=2)


@pytest.mark.parametrize("size, match", [(3, "divide the model's 4 attention heads"),
                                         (0, "must be an int >= 1")])
def test_a_size_that_does_not_divide_the_heads_is_refused(size, match):
    with pytest.raises(ValueError, match=match):
        LLM(BUILD, tensor_parallel_size=size)
    assert workers_alive() == []


def test_more_gpus_than_exist_is_refused():
    n = max(2, torch.cuda.device_count() + 1)
    cfg = LlamaConfig(num_heads=4 * n, num_kv_heads=n, head_size=16, hidden_size=64,
                      intermediate_size=64 * n)
    with pytest.raises(ValueError, match=f"needs {n} GPUs"):
        LLM(functools.partial(TinyLlama, cfg), tensor_parallel_size=n, device="cuda")
    with pytest.raises(ValueError, match=f"needs {n} GPUs"):  # before the builder runs
        LLM(functools.partial(TinyLlama, cfg, device="cuda"), tensor_parallel_size=n)


def test_kv_heads_are_split_or_replicated_like_vllm():
    assert [list(Shard(r, 4).kv_heads(8)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [list(Shard(r, 4).kv_heads(2)) for r in range(4)] == [[0], [0], [1], [1]]
    assert [list(Shard(r, 4).heads(8)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert LLM(BUILD, num_blocks=4).model.num_kv_heads == 2  # N=1 takes a builder too
    with pytest.raises(ValueError, match="KV heads"):
        LLM(functools.partial(TinyLlama, LlamaConfig(num_heads=12, num_kv_heads=3)),
            tensor_parallel_size=2)


def test_torchrun_runs_the_same_script_on_every_rank():
    """examples/tp_generate.py under torchrun: rank 0 generates, rank 1 serves."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "examples.tp_generate"],
                         capture_output=True, text=True, cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("rank 0 of 2:") == 3
    assert "one process gives the same tokens: True" in out.stdout
