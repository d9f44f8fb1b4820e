"""torch_pagedkv inside vLLM's CPU build, through `vllm.LLM`.

Specification: with `attention_backend="CUSTOM"` vLLM runs its attention on our ops
(its workers' attention layers hold our PagedKVImpl); without the switch it keeps
CPU_ATTN (the reference runs below are those). In float32, with prefix caching, chunked
prefill (128-token step budget) and a batch of varied prompt lengths, greedy tokens equal
vLLM's own CPU_ATTN token for token on Llama (GQA), Mistral (sliding window 48) and Bloom
(ALiBi). In bfloat16 ours and CPU_ATTN agree in first tokens; an fp8 KV cache runs (CPU_ATTN
refuses fp8 on this AVX2 machine) and its first tokens are quoted against float32: on
these tiny random models even bfloat16 flips about a quarter of them, so that number
measures the model's near-ties, not a bug (the impl test checks fp8 against the
reference). tensor_parallel_size=2 gives TP=1's tokens; a configuration we cannot run is
refused when LLM(...) starts, naming us.

Each vLLM start costs 30-60 s on this machine, so every engine is started once per
module and runs all of its workloads back to back.
"""
import os

import pytest

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc(fn)

from vllm import LLM, SamplingParams  # noqa: E402

NEW_TOKENS = 16
ENGINE = dict(dtype="float32", skip_tokenizer_init=True, enforce_eager=True,
              max_model_len=1024, enable_prefix_caching=True, enable_chunked_prefill=True,
              max_num_batched_tokens=128, seed=0)


def prompts(lengths, seed, prefix=()):
    """Token-id prompts of the given lengths (after a shared prefix), ids 3..VOCAB-1."""
    out = []
    for i, n in enumerate(lengths):
        ids = list(prefix) + [(seed * 131 + i * 37 + j * 7) % 500 + 3 for j in range(n)]
        out.append({"prompt_token_ids": ids})
    return out


SHARED = [(11 * j) % 500 + 3 for j in range(200)]
# Two rounds: the second shares the first's 200-token prefix (prefix-cache hits) and the
# 700-token prompt is prefilled in 128-token chunks beside the others' decodes.
WORKLOADS = [prompts([1, 9, 33, 64, 130, 700], seed=1),
             prompts([5, 40, 97, 260], seed=2, prefix=SHARED),
             prompts([3, 70, 150], seed=3, prefix=SHARED)]


def attention_impls(worker) -> list[str]:
    return sorted({type(m.impl).__name__ for m in worker.model_runner.model.modules()
                   if hasattr(m, "impl")})


def run(path, backend, *, workloads=WORKLOADS, **overrides):
    """Greedy tokens of each workload, in order, the workers' attention classes, and the
    first worker's per-phase timing of each workload (benchmarks/vllm_phases.py, which
    bench_vllm measures with)."""
    from benchmarks import vllm_phases
    llm = LLM(model=path, attention_backend=backend, **{**ENGINE, **overrides})
    try:
        llm.collective_rpc(vllm_phases.install)
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
        tokens, phases = [], []
        for w in workloads:
            tokens.append([list(o.outputs[0].token_ids) for o in llm.generate(w, params)])
            phases.append(llm.collective_rpc(vllm_phases.take)[0])
        return tokens, llm.collective_rpc(attention_impls), phases
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm


@pytest.fixture(scope="module")
def llama_runs(checkpoints):
    """Our backend and vLLM's default (no switch: CPU_ATTN) at 32-token blocks."""
    return {b: run(checkpoints["llama"], b, block_size=32) for b in (None, "CUSTOM")}


@pytest.mark.parametrize("model", ["llama", "mistral", "bloom"])
def test_greedy_tokens_equal_cpu_attn_fp32(model, checkpoints, llama_runs):
    if model == "llama":
        ref, ours = llama_runs[None], llama_runs["CUSTOM"]
    else:  # vLLM's default CPU block size (128)
        ref, ours = (run(checkpoints[model], b) for b in (None, "CUSTOM"))
    assert ours[1] == [["PagedKVImpl"]]
    assert ref[1] == [["CPUAttentionBackendImpl"]]  # installed, we change nothing unasked
    assert ours[0] == ref[0]


@pytest.mark.parametrize("backend", [None, "CUSTOM"])
def test_phase_timing_counts_every_scheduled_token(backend, llama_runs):
    """bench_vllm's per-phase numbers: the first workload (empty prefix cache) schedules
    each prompt token once and NEW_TOKENS - 1 decode tokens per request, split between
    prefill steps (any request with 2+ tokens) and decode-only steps; the attention calls
    (KV write + attention) are timed inside the steps they run in."""
    phases = llama_runs[backend][2][0]
    lengths = [len(p["prompt_token_ids"]) for p in WORKLOADS[0]]
    pre, dec = phases["prefill"], phases["decode"]
    assert pre["tokens"] + dec["tokens"] == sum(lengths) + len(lengths) * (NEW_TOKENS - 1)
    assert pre["steps"] >= -(-sum(lengths) // ENGINE["max_num_batched_tokens"])
    # the 700-token prompt alone decodes after the others finish: decode-only steps
    assert dec["steps"] >= 1 and dec["tokens"] >= dec["steps"]
    for p in (pre, dec):
        assert 0 < p["attention_s"] < p["step_s"]


def first_token_agreement(a, b) -> float:
    pairs = [(x[0], y[0]) for wa, wb in zip(a, b) for x, y in zip(wa, wb)]
    return sum(x == y for x, y in pairs) / len(pairs)


def test_bf16_and_fp8_kv_cache_agree_in_first_tokens(checkpoints, llama_runs):
    path, fp32 = checkpoints["llama"], llama_runs[None][0]
    ours_bf16 = run(path, "CUSTOM", dtype="bfloat16", block_size=32)[0]
    ref_bf16 = run(path, "CPU_ATTN", dtype="bfloat16", block_size=32)[0]
    fp8 = run(path, "CUSTOM", kv_cache_dtype="fp8", block_size=32)[0]  # e4m3, scale 1
    agreement = {"bf16 ours vs bf16 CPU_ATTN": first_token_agreement(ours_bf16, ref_bf16),
                 "bf16 ours vs fp32": first_token_agreement(ours_bf16, fp32),
                 "bf16 CPU_ATTN vs fp32": first_token_agreement(ref_bf16, fp32),
                 "fp8 cache ours vs fp32": first_token_agreement(fp8, fp32)}
    print("first-token agreement:", agreement)
    assert all(len(t) == NEW_TOKENS for w in fp8 + ours_bf16 for t in w)
    assert agreement["bf16 ours vs bf16 CPU_ATTN"] >= 0.9, agreement
    assert agreement["fp8 cache ours vs fp32"] >= 0.5, agreement


def test_tensor_parallel_2_equals_tp1(checkpoints, llama_runs, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank
    tokens, impls, _ = run(checkpoints["llama"], "CUSTOM", workloads=WORKLOADS[:2],
                        block_size=32, tensor_parallel_size=2)
    assert impls == [["PagedKVImpl"], ["PagedKVImpl"]]
    assert tokens == llama_runs["CUSTOM"][0][:2]


@pytest.mark.parametrize("overrides, says", [
    (dict(hf_overrides={"head_dim": 36}), "head_size 36"),
    (dict(kv_cache_dtype="float16"), "kv_cache_dtype 'float16' with a torch.float32 model"),
    (dict(block_size=512), "block_size 512"),
])
def test_unsupported_configuration_is_refused_at_start(checkpoints, overrides, says):
    with pytest.raises(Exception, match="torch_pagedkv") as err:
        LLM(model=checkpoints["llama"], attention_backend="CUSTOM", **{**ENGINE, **overrides})
    assert says in str(err.value)
