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
from collections.abc import Iterator
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _load, knobs, ops

_HERE = os.path.dirname(os.path.abspath(__file__))
ORDERS = ("random", "forward", "reverse")


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
                  "decode_splits": "auto"}


def _sync_knobs() -> None:
    """The knobs set so far in this process hold for the emulated kernels too: each main
    value is read (set to its default, which returns it, then put back) and copied."""
    main, emulated = torch.ops.pagedkv._set_knob, torch.ops.pagedkv_simt._set_knob
    for name in knobs.KNOBS:
        value = main(name, _KNOB_DEFAULTS[name])
        main(name, value)
        emulated(name, value)




def reshape_and_cache(key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor,
                      slot_mapping: Tensor, k_scale: Optional[Tensor] = None,
                      v_scale: Optional[Tensor] = None) -> None:
    _ops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)


def paged_attention(query: Tensor, key_cache: Tensor, value_cache: Tensor, block_table: Tensor,
                    seq_lens: Tensor, query_start_loc: Tensor, scale: float,
                    alibi_slopes: Optional[Tensor] = None, sliding_window: int = -1,
                    softcap: float = 0.0, k_scale: Optional[Tensor] = None,
                    v_scale: Optional[Tensor] = None) -> Tensor:
    return _ops.paged_attention(query, key_cache, value_cache, block_table, seq_lens,
                                query_start_loc, scale, alibi_slopes, sliding_window, softcap,
                                k_scale, v_scale)


def paged_attention_lse(query: Tensor, key_cache: Tensor, value_cache: Tensor,
                        block_table: Tensor, seq_lens: Tensor, query_start_loc: Tensor,
                        scale: float, alibi_slopes: Optional[Tensor] = None,
                        sliding_window: int = -1, softcap: float = 0.0,
                        k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None,
                        causal: bool = True) -> tuple[Tensor, Tensor]:
    return _ops.paged_attention_lse(query, key_cache, value_cache, block_table, seq_lens,
                                    query_start_loc, scale, alibi_slopes, sliding_window,
                                    softcap, k_scale, v_scale, causal)


def merge_attn_states(out_a: Tensor, lse_a: Tensor, out_b: Tensor,
                      lse_b: Tensor) -> tuple[Tensor, Tensor]:
    return _ops.merge_attn_states(out_a, lse_a, out_b, lse_b)


def copy_blocks(key_caches: Sequence[Tensor], value_caches: Sequence[Tensor],
                block_mapping: Tensor) -> None:
    _ops.copy_blocks(list(key_caches), list(value_caches), block_mapping)


def swap_blocks(src: Tensor, dst: Tensor, block_mapping: Tensor) -> None:
    _ops.swap_blocks(src, dst, block_mapping)


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
