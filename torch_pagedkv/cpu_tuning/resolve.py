"""What the engine asks: the choices for its model on this CPU, measured when missing.

    tuning = resolve("auto", contexts_for_model(model, cache_dtype, block_size))
    tuning.apply()                 # linear policy and kernel knobs in force
    rule = tuning.cascade_rule(ctx)

mode "off": every choice its documented default, nothing read or measured. "auto": the
table file of this CPU identity in the cache folder (table.default_path); a context it
lacks is measured (bounded: BUDGET_S seconds for all of them, one progress line) and the
file rewritten. A path: the same with that file.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from . import identity, policy, table
from .choices import (AttentionChoice, CascadeChoice, Choice, LinearChoice, attention_context,
                      default_for, kind_of, linear_context)

BUDGET_S = 20.0
ENV_MODE = "PAGEDKV_CPU_TUNING"  # the default of LLM(cpu_tuning=None): auto, off or a path


@dataclass
class Resolved:
    choice: Choice
    source: str  # "default", "table" (read from the file) or "measured" (this process)
    measured: dict = field(default_factory=dict)


@dataclass
class CpuTuning:
    mode: str
    path: Optional[Path]
    ident: identity.CpuIdentity
    choices: dict[str, Resolved]
    seconds: float = 0.0  # spent measuring in this process
    note: Optional[str] = None  # why the file was not written, when it was not

    def choice(self, context: str) -> Choice:
        r = self.choices.get(context)
        return r.choice if r is not None else default_for(context, self.ident.threads)

    def apply(self) -> None:
        """Puts the linear choices and the attention kernels' choice in force."""
        from .. import knobs
        for context, r in self.choices.items():
            kind = kind_of(context)
            if kind == "linear":
                _, dtype, shape = context.split("/")
                out_f, in_f = (int(x) for x in shape.split("x"))
                if r.source == "default":
                    policy.set_linear(getattr(torch, dtype), out_f, in_f, None)
                else:
                    policy.set_linear(getattr(torch, dtype), out_f, in_f,
                                      r.choice.packed_max_rows, r.choice.packed_min_rows)
            elif kind == "attention":
                for name, value in r.choice.knobs().items():
                    if name in knobs.KNOBS:
                        knobs.set_knob(name, value)

    def cascade_rule(self, context: str):
        from ..cache.step_plan import CascadeRule
        c = self.choice(context)
        return CascadeRule(min_seqs=c.min_seqs, min_shared_tokens=c.min_shared_tokens)

    def lines(self) -> list[str]:
        """What is in force and why, one line per context (pagedkv tune --cpu --show)."""
        where = {"off": "cpu_tuning='off': documented defaults"}.get(self.mode, str(self.path))
        out = [f"CPU: {identity.describe(self.ident.threads)}", f"key: {self.ident.key}",
               f"table: {where}"]
        for context, r in sorted(self.choices.items()):
            why = {"default": "default (not measured)", "table": "measured (from the table)",
                   "measured": "measured now"}[r.source]
            detail = f"  {_summary(r.measured)}" if r.measured else ""
            out.append(f"  {context}: {_fmt(r.choice)}  [{why}]{detail}")
        return out


def _fmt(choice: Choice) -> str:
    from .choices import ALL_ROWS, NEVER_SEQS
    if isinstance(choice, LinearChoice):
        lo, hi = choice.packed_min_rows, choice.packed_max_rows
        if hi == 0 or lo > hi:
            return "aten at every size"
        span = f"from {lo} rows" if hi >= ALL_ROWS else f"{lo}-{hi} rows"
        return "packed at every size" if lo == 1 and hi >= ALL_ROWS else f"packed {span}, aten else"
    if isinstance(choice, CascadeChoice):
        if choice.min_seqs >= NEVER_SEQS:
            return "cascade never"
        return f"cascade at {choice.min_seqs}+ sequences sharing {choice.min_shared_tokens}+ tokens"
    assert isinstance(choice, AttentionChoice)
    return ", ".join(f"{k}={v}" for k, v in vars(choice).items())


def _summary(measured: dict) -> str:
    items = []
    for key, value in measured.items():
        if isinstance(value, dict):
            parts = [f"{k}:{v.get('verdict', v) if isinstance(v, dict) else v}" +
                     (f"({next(iter(x for n, x in v.items() if '/' in n), '')})"
                      if isinstance(v, dict) else "")
                     for k, v in value.items()]
            items.append(f"{key} " + " ".join(parts))
        else:
            items.append(f"{key}={value}")
    return "; ".join(items)


def contexts_for_model(model: torch.nn.Module, cache_dtype: torch.dtype, block_size: int,
                       *, cascade: bool = True) -> list[str]:
    """The contexts an engine over model needs: each CPU linear weight shape, the
    attention kernels', and the cascade rule's when the engine decides cascade itself."""
    contexts = []
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, torch.nn.Linear) and w is not None and w.device.type == "cpu":
            contexts.append(linear_context(w.dtype, w.shape[0], w.shape[1]))
    heads = (num_heads_of(model), model.num_kv_heads, model.head_size, block_size)
    contexts.append(attention_context("attention", cache_dtype, *heads))
    if cascade:
        contexts.append(attention_context("cascade", cache_dtype, *heads))
    return list(dict.fromkeys(contexts))


def num_heads_of(model: torch.nn.Module) -> int:
    """Query heads of the model's attention layers (its PagedAttention modules; HF models
    run through the adapter carry num_heads themselves)."""
    from ..layers.attention import PagedAttention
    for m in model.modules():
        if isinstance(m, PagedAttention):
            return m.num_heads
    return int(getattr(model, "num_heads", model.num_kv_heads))


def _path_of(mode: Union[str, os.PathLike], ident: identity.CpuIdentity) -> Optional[Path]:
    if mode == "off":
        return None
    if mode == "auto":
        return table.default_path(ident)
    return Path(mode)


def resolve(mode: Union[str, os.PathLike, None], contexts: list[str], *,
            measure: bool = True, budget_s: float = BUDGET_S,
            remeasure: bool = False, progress=None) -> CpuTuning:
    """The choices of contexts under mode (module docstring). measure=False: a context
    the table lacks keeps its default (--show). remeasure: measure every context anew
    (pagedkv tune --cpu). progress: a callable taking one line, default stderr."""
    if mode is None:
        mode = os.environ.get(ENV_MODE) or "auto"
    if not isinstance(mode, (str, os.PathLike)):
        raise TypeError(f"cpu_tuning must be 'auto', 'off' or a path, got {mode!r}")
    mode = mode if mode in ("auto", "off") else os.fspath(mode)
    ident = identity.probe()
    path = _path_of(mode, ident)
    if path is None:
        return CpuTuning("off", None, ident, {c: Resolved(default_for(c, ident.threads), "default")
                                              for c in contexts})
    library = table.library_id()
    stored = table.load(path, ident, library)
    chosen: dict[str, Resolved] = {}
    missing = []
    for c in contexts:
        if c in stored and not remeasure:
            chosen[c] = Resolved(stored[c].choice, "table", stored[c].measured)
        elif measure:
            missing.append(c)
        else:
            chosen[c] = Resolved(default_for(c, ident.threads), "default")
    spent, note = 0.0, None
    if missing:
        from . import measure as m
        say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
        say(f"torch_pagedkv: tuning the CPU path for {ident.model} ({len(missing)} choices, "
            f"at most {budget_s:.0f} s; cached in {path})")
        start = time.perf_counter()
        new: dict[str, table.Entry] = {}
        for i, c in enumerate(missing):
            share = (start + budget_s - time.perf_counter()) / (len(missing) - i)
            choice, measured = m.measure(c, default_for(c, ident.threads), m.Budget(share))
            chosen[c] = Resolved(choice, "measured", measured)
            new[c] = table.Entry(choice, measured)
        spent = time.perf_counter() - start
        note = table.save(path, ident, library, new)
        say(f"torch_pagedkv: CPU tuning done in {spent:.1f} s"
            + (f" ({note})" if note else ""))
    return CpuTuning(mode if mode in ("auto", "off") else "path", path, ident, chosen,
                     spent, note)
