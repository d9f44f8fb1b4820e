"""The CUDA backend run on the CPU by the SIMT emulator (csrc/simt, docs/emulation.md).

The six ops below have exactly the signatures of ``torch.ops.pagedkv`` and take CPU
tensors, but execute the CUDA backend: its glue (argument checks, ``decode_plan``, mixed-
batch routing, launch configs, the knobs) and the CUDA kernels' own source, compiled by the
host compiler, each CTA's threads run as fibers with faithful barriers and warp shuffles.
Only where the memory lives and who runs the threads differ from a GPU run, so a test
written against ``torch.ops.pagedkv`` runs unchanged against this module.

The library is test-only: ``make test`` builds it (``PAGEDKV_SIMT=1``); ``available()``
says whether this checkout has it.

    from torch_pagedkv import emulation
    with emulation.settings(order="reverse"):
        out = emulation.paged_attention(q, kc, vc, bt, sl, qsl, scale)
"""
from __future__ import annotations

import contextlib
import glob
import os
import types
from collections.abc import Iterator
from typing import Optional

import torch

from . import _load, knobs, ops  # noqa: F401  (_load: torch.ops.pagedkv, whose knobs are copied)

_HERE = os.path.dirname(os.path.abspath(__file__))


def _library() -> Optional[str]:
    """$PAGEDKV_SIMT_LIBRARY (another build of it, e.g. scripts/simt_teeth.py's mutants),
    else the one built in this checkout."""
    override = os.environ.get("PAGEDKV_SIMT_LIBRARY")
    if override:
        return override
    found = sorted(glob.glob(os.path.join(_HERE, "_simt*.so")))
    return found[0] if found else None


def available() -> bool:
    """Whether the emulated library is built in this checkout."""
    return _library() is not None


def _load_library() -> None:
    path = _library()
    if path is None:
        raise ImportError("torch_pagedkv._simt (the SIMT-emulated CUDA kernels) is not built: "
                          "run `make test`, or `PAGEDKV_SIMT=1 make build`")
    torch.ops.load_library(path)
    knobs._SETTERS.append(torch.ops.pagedkv_simt._set_knob)
    lib = torch.library.Library("pagedkv_simt", "IMPL")
    lib.impl("_install_launch_configs", _install_launch_configs, "CompositeExplicitAutograd")
    globals()["_LIB"] = lib
    for name, fake in ops.FAKES.items():  # the same schemas: the same fake implementations
        torch.library.register_fake(f"pagedkv_simt::{name}", fake, lib=lib)
    _sync_knobs()
    # PAGEDKV_SIMT_ORDER / PAGEDKV_SIMT_SEED: the thread order a process starts with (a
    # whole test run in forward or reverse order: scripts/simt_teeth.py).
    configure(os.environ.get("PAGEDKV_SIMT_ORDER", "random"),
              int(os.environ.get("PAGEDKV_SIMT_SEED", "0")))


def _install_launch_configs() -> None:
    from .tuning import table
    table.install(torch.ops.pagedkv_simt)


_KNOB_DEFAULTS = {"generic_kernels": "0", "attention_path": "auto", "debug": "0",
                  "decode_splits": "auto", "cpu_isa": "auto", "cpu_vectors_per_head": "32",
                  "cpu_vectors_per_item": "64", "cpu_prefix_vectors_per_head": "256",
                  "cpu_serial_products": "2048"}


def _sync_knobs() -> None:
    """The knobs set so far in this process hold for the emulated kernels too: each main
    value is read (set to its default, which returns it, then put back) and copied."""
    main, emulated = torch.ops.pagedkv._set_knob, torch.ops.pagedkv_simt._set_knob
    for name in knobs.KNOBS:
        value = main(name, _KNOB_DEFAULTS[name])
        main(name, value)
        emulated(name, value)


def _on_emulator(wrapper):
    """ops.py's typed wrapper `wrapper`, calling torch.ops.pagedkv_simt instead of
    torch.ops.pagedkv: the same code, so the same argument names, order, defaults and
    return values, by construction."""
    emulated = types.FunctionType(wrapper.__code__, {**wrapper.__globals__, "_ops": _ops},
                                  wrapper.__name__, wrapper.__defaults__, wrapper.__closure__)
    emulated.__kwdefaults__ = wrapper.__kwdefaults__
    emulated.__doc__ = f"{wrapper.__doc__}\n\n(Run by the CUDA backend on the SIMT emulator.)"
    emulated.__annotations__ = wrapper.__annotations__
    emulated.__module__ = __name__
    return emulated


# ---- the emulator's own controls ----

def configure(order: str = "random", seed: int = 0, profile: str | int = 0) -> None:
    """Thread order between synchronization points (random: a seeded shuffle per launch
    and CTA; forward: thread 0 first; reverse: the last thread first), its seed, and the
    device profile (0 or "H100": an H100 SXM; 1 or "H200")."""
    if isinstance(profile, str):
        names = _ops._simt_profiles()
        matches = [i for i, n in enumerate(names) if profile.upper() in n.upper()]
        if len(matches) != 1:
            raise ValueError(f"profile must name one of {names}, got {profile!r}")
        profile = matches[0]
    _ops._simt_configure(order, seed, profile)


def current_settings() -> dict:
    """{"order", "seed", "profile" (index), "device" (the profile's name)}."""
    order, seed, profile, device = _ops._simt_settings()
    return {"order": order, "seed": int(seed), "profile": int(profile), "device": device}


@contextlib.contextmanager
def settings(order: str = "random", seed: int = 0, profile: str | int = 0) -> Iterator[None]:
    """configure() for the duration of the block, then the previous settings again."""
    before = current_settings()
    configure(order, seed, profile)
    try:
        yield
    finally:
        configure(before["order"], before["seed"], before["profile"])


def counters() -> dict:
    """Launches, CTAs, threads, barriers and warp operations run since the last reset, and
    the launched kernels' names in order."""
    launches, ctas, threads, barriers, warp_ops = _ops._simt_counters()
    return {"launches": launches, "ctas": ctas, "threads": threads, "barriers": barriers,
            "warp_ops": warp_ops, "kernels": list(_ops._simt_kernels())}


def reset_counters() -> None:
    _ops._simt_reset_counters()


_ops = torch.ops.pagedkv_simt
_load_library()

reshape_and_cache = _on_emulator(ops.reshape_and_cache)
paged_attention = _on_emulator(ops.paged_attention)
paged_attention_lse = _on_emulator(ops.paged_attention_lse)
merge_attn_states = _on_emulator(ops.merge_attn_states)
copy_blocks = _on_emulator(ops.copy_blocks)
swap_blocks = _on_emulator(ops.swap_blocks)
