"""What the attention backend owns inside vLLM, per phase, measured in vLLM's worker.

Installed into each worker through `collective_rpc(install)`: every step (the worker's
execute_model + sample_tokens) is timed and counted as a *prefill* step when a request in
it has more than one scheduled token (chunked prefill and mixed batches included), else
as a *decode* step; every attention layer's KV write (`do_kv_cache_update`) and attention
call (`forward`) is timed into the phase of the step it runs in. `collective_rpc(take)`
returns and resets the sums. So decode time is measured directly, in the run that
produced it, not as the difference of two runs.

Per phase: steps, tokens (scheduled query tokens), step_s (worker time of those steps),
attention_s (KV write + attention calls). Worker time leaves out the engine core's
scheduling and detokenization, which no backend changes.
"""
from __future__ import annotations

import time

PHASES = ("prefill", "decode")


def _empty() -> dict:
    return {p: {"steps": 0, "tokens": 0, "step_s": 0.0, "attention_s": 0.0} for p in PHASES}


def _phase_of(scheduler_output) -> str | None:
    counts = getattr(scheduler_output, "num_scheduled_tokens", None) or {}
    if not counts:
        return None  # an empty step (nothing scheduled)
    return "decode" if max(counts.values()) == 1 else "prefill"


def _timed(worker, fn, key: str, before=None):
    """fn, its time added to the current phase's `key` (after `before(*args)`, which may
    set the phase)."""
    def wrapped(*a, **k):
        if before is not None:
            before(*a)
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            if worker._pagedkv_phase is not None:
                worker._pagedkv_phases[worker._pagedkv_phase][key] += time.perf_counter() - t0
    return wrapped


def install(wrapper) -> None:
    """In a worker (the object collective_rpc hands a function): wrap its step methods
    and every attention impl. Idempotent."""
    worker = getattr(wrapper, "worker", wrapper)  # WorkerWrapperBase forwards to .worker
    if getattr(worker, "_pagedkv_phases", None) is not None:
        return
    worker._pagedkv_phases = _empty()
    worker._pagedkv_phase = None

    def start_step(scheduler_output, *_):
        phase = worker._pagedkv_phase = _phase_of(scheduler_output)
        if phase is not None:
            s = worker._pagedkv_phases[phase]
            s["steps"] += 1
            s["tokens"] += sum(scheduler_output.num_scheduled_tokens.values())

    worker.execute_model = _timed(worker, worker.execute_model, "step_s", start_step)
    worker.sample_tokens = _timed(worker, worker.sample_tokens, "step_s")
    for m in worker.model_runner.model.modules():
        impl = getattr(m, "impl", None)
        if impl is None or getattr(impl, "_pagedkv_timed", False):
            continue
        impl._pagedkv_timed = True
        for name in ("forward", "do_kv_cache_update"):
            setattr(impl, name, _timed(worker, getattr(impl, name), "attention_s"))


def take(wrapper) -> dict:
    """The sums since the last take (or install), reset."""
    worker = getattr(wrapper, "worker", wrapper)
    out, worker._pagedkv_phases = worker._pagedkv_phases, _empty()
    return out
