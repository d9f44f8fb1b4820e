"""The prefix tiers inside vLLM (issue 27): a second run's prefill, cold vs our tiers vs vLLM's.

Case study 1 on bench_vllm's checkpoint (4 layers, hidden 512, 8/2 heads of 64, fp32,
our backend, block size 32, prefix caching on): turn 1 is 64 requests sharing one
500-token prompt plus 50-200 own tokens; turn 2 is each request's turn-1 prompt, its
answer (32 tokens) and 50 new tokens. Each configuration runs both turns in a vLLM
instance started for it, after a writer instance has run turn 1 where the tier needs it;
timed per turn: the batch's time to first token (generate with max_tokens=1: every
request's prefill) and the prompt tokens vLLM counted as cached.
  cold          no connector: everything computed (turn 2 hits vLLM's device cache)
  restart       PagedKVTierConnector, disk_cache_dir written by an earlier instance
  host          PagedKVTierConnector host tier only, in the writer's instance after
                llm.reset_prefix_cache() (the device cache emptied, the tier kept)
  vllm-offload  vLLM's own CPU offloading (kv_offloading_size, backend native), the same
                way as host: whether it runs on vLLM's CPU build is part of the result

    .venv-vllm/bin/python -m benchmarks.bench_vllm_tiers [--rounds N] [--write-results]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
import traceback

from benchmarks import machine
# (importing bench_vllm sets vLLM's environment defaults for the benchmarks)
from benchmarks.bench_vllm import BLOCK_SIZE, VOCAB, save_checkpoint

ANSWER = 32
CONNECTOR = dict(kv_connector="PagedKVTierConnector",
                 kv_connector_module_path="torch_pagedkv.vllm.connector", kv_role="kv_both")


def turns(seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """Turn 1's prompts and, per request, the 50 new tokens its turn 2 adds."""
    rng = random.Random(seed)
    prefix = [rng.randrange(3, VOCAB) for _ in range(500)]
    first = [prefix + [rng.randrange(3, VOCAB) for _ in range(rng.randint(50, 200))]
             for _ in range(64)]
    return first, [[rng.randrange(3, VOCAB) for _ in range(50)] for _ in first]


def engine(path: str, **kw):
    from vllm import LLM
    return LLM(model=path, attention_backend="CUSTOM", dtype="float32",
               skip_tokenizer_init=True, max_model_len=2048, block_size=BLOCK_SIZE,
               enable_prefix_caching=True, seed=0, **kw)


def timed(llm, prompts, max_tokens: int):
    from vllm import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - t0, outs


def both_turns(llm, first, extra) -> dict:
    """TTFT of turn 1 and turn 2 (the answers generated in between, untimed)."""
    out = {}
    out["turn 1 s"], o1 = timed(llm, first, 1)
    out["turn 1 cached"] = sum(o.num_cached_tokens for o in o1)
    _, answers = timed(llm, first, ANSWER)
    second = [p + list(a.outputs[0].token_ids) + e
              for p, a, e in zip(first, answers, extra)]
    out["turn 2 s"], o2 = timed(llm, second, 1)
    out["turn 2 cached"] = sum(o.num_cached_tokens for o in o2)
    out["tokens"] = [list(a.outputs[0].token_ids) for a in answers]
    return out


def stop(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


def run_config(name: str, path: str, first, extra, workdir: str) -> dict:
    if name == "cold":
        llm = engine(path)
        try:
            return both_turns(llm, first, extra)
        finally:
            stop(llm)
    if name == "restart":
        disk = tempfile.mkdtemp(dir=workdir)
        tier = dict(kv_transfer_config={**CONNECTOR, "kv_connector_extra_config": {
            "disk_cache_dir": disk}})
        writer = engine(path, **tier)
        try:
            both_turns(writer, first, extra)  # what an earlier run computed
        finally:
            stop(writer)
        llm = engine(path, **tier)
        try:
            return both_turns(llm, first, extra)
        finally:
            stop(llm)
    if name == "host":
        kw = dict(kv_transfer_config={**CONNECTOR, "kv_connector_extra_config": {
            "host_cache_bytes": "1GiB"}})
    else:  # vllm-offload
        kw = dict(kv_offloading_size=1.0, kv_offloading_backend="native")
    llm = engine(path, **kw)
    try:
        both_turns(llm, first, extra)
        llm.reset_prefix_cache()
        return both_turns(llm, first, extra)
    finally:
        stop(llm)


CONFIGS = ("cold", "restart", "host", "vllm-offload")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args(argv)
    print(machine.line(2), flush=True)
    first, extra = turns()
    results: dict[str, list[dict]] = {}
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as workdir:
        path = os.path.join(workdir, "llama")
        save_checkpoint(path)
        for r in range(args.rounds):
            for name in args.configs.split(","):
                if name in errors:
                    continue
                try:
                    res = run_config(name, path, first, extra, workdir)
                except Exception as e:  # noqa: BLE001 - a peer that does not run is a result
                    errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    traceback.print_exc()
                    continue
                results.setdefault(name, []).append(res)
                print(f"round {r + 1} {name}: turn 1 {res['turn 1 s']:.2f} s "
                      f"({res['turn 1 cached']} cached), turn 2 {res['turn 2 s']:.2f} s "
                      f"({res['turn 2 cached']} cached)", flush=True)
    body = report(results, errors, first, args.rounds)
    print(body)
    if args.write_results:
        from benchmarks.results_file import write_section
        write_section("Prefix tiers inside vLLM (issue 27)", body)
    return 0


def report(results, errors, first, rounds) -> str:
    n1 = sum(len(p) for p in first)
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    span = lambda rs, k: (f"{min(r[k] for r in rs):.2f}-{max(r[k] for r in rs):.2f}"  # noqa: E731
                          if len(rs) > 1 else f"{rs[0][k]:.2f}")
    cold = results.get("cold")
    lines = [machine.line(2) + ".", "",
             " ".join(__doc__.split("\n\n")[1].split()), "",
             f"Turn 1: {len(first)} requests, {n1} prompt tokens; {rounds} round(s), "
             "each configuration in instances of its own.", "",
             "| configuration | turn 1 TTFT s | cached tokens | turn 2 TTFT s | cached tokens "
             "| turn 1 vs cold |", "|---|---|---|---|---|---|"]
    for name in CONFIGS:
        if name in errors:
            lines.append(f"| {name} | does not run: {errors[name]} | | | | |")
            continue
        rs = results.get(name)
        if not rs:
            continue
        speed = (f"{med(cold, 'turn 1 s') / med(rs, 'turn 1 s'):.2f}x" if cold else "")
        lines.append(f"| {name} | {span(rs, 'turn 1 s')} | {rs[0]['turn 1 cached']} | "
                     f"{span(rs, 'turn 2 s')} | {rs[0]['turn 2 cached']} | {speed} |")
    if cold:
        same = {n: all(r["tokens"] == cold[0]["tokens"] for r in rs)
                for n, rs in results.items() if n != "cold"}
        lines += ["", "Greedy answers equal to cold's: "
                  + ", ".join(f"{n} {'yes' if ok else 'NO'}" for n, ok in same.items()) + "."]
    lines += ["", "Command: `.venv-vllm/bin/python -m benchmarks.bench_vllm_tiers "
              f"--rounds {rounds} --write-results`"]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
