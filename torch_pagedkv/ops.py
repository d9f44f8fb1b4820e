"""Typed wrappers over torch.ops.pagedkv.*, each with its fake (meta) implementation
beside it, so torch.compile traces the ops without running them.
The contract (layout, semantics, errors) is docs/design.md §2.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _load  # noqa: F401  (registers torch.ops.pagedkv)

_ops = torch.ops.pagedkv

# The fake implementations by op name: torch_pagedkv.emulation registers them for its own
# namespace too (the emulated ops have the same schemas).
FAKES: dict = {}


def _register_fake(name: str):
    def register(fn):
        FAKES[name] = fn
        return torch.library.register_fake(f"pagedkv::{name}")(fn)
    return register


def reshape_and_cache(key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor,
                      slot_mapping: Tensor, k_scale: Optional[Tensor] = None,
                      v_scale: Optional[Tensor] = None) -> None:
    """Writes key/value [num_tokens, num_kv_heads, head_size] into the paged caches at
    slot_mapping (int64; a negative slot skips its token). fp8 caches store x / scale."""
    _ops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)


@_register_fake("reshape_and_cache")
def _(key, value, key_cache, value_cache, slot_mapping, k_scale=None, v_scale=None):
    torch._check(key.dim() == 3 and key_cache.dim() == 4,
                 lambda: "reshape_and_cache: key must be 3-D and key_cache 4-D")
    torch._check(slot_mapping.shape[0] == key.shape[0],
                 lambda: "reshape_and_cache: slot_mapping must have num_tokens entries")
    return None


def paged_attention(query: Tensor, key_cache: Tensor, value_cache: Tensor, block_table: Tensor,
                    seq_lens: Tensor, query_start_loc: Tensor, scale: float,
                    alibi_slopes: Optional[Tensor] = None, sliding_window: int = -1,
                    softcap: float = 0.0, k_scale: Optional[Tensor] = None,
                    v_scale: Optional[Tensor] = None) -> Tensor:
    """Causal attention of query [num_q_tokens, num_heads, head_size] over each sequence's
    paged K/V; sequence i owns query rows [query_start_loc[i], query_start_loc[i+1])."""
    return _ops.paged_attention(query, key_cache, value_cache, block_table, seq_lens,
                                query_start_loc, scale, alibi_slopes, sliding_window, softcap,
                                k_scale, v_scale)


@_register_fake("paged_attention")
def _(query, key_cache, value_cache, block_table, seq_lens, query_start_loc, scale,
      alibi_slopes=None, sliding_window=-1, softcap=0.0, k_scale=None, v_scale=None):
    torch._check(query.dim() == 3, lambda: "paged_attention: query must be 3-D")
    torch._check(query.shape[2] == key_cache.shape[3],
                 lambda: "paged_attention: query head_size must equal key_cache.size(3)")
    torch._check(query_start_loc.shape[0] == block_table.shape[0] + 1,
                 lambda: "paged_attention: query_start_loc must have num_seqs + 1 entries")
    return torch.empty(query.shape, dtype=query.dtype, device=query.device)


def paged_attention_lse(query: Tensor, key_cache: Tensor, value_cache: Tensor,
                        block_table: Tensor, seq_lens: Tensor, query_start_loc: Tensor,
                        scale: float, alibi_slopes: Optional[Tensor] = None,
                        sliding_window: int = -1, softcap: float = 0.0,
                        k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None,
                        causal: bool = True) -> tuple[Tensor, Tensor]:
    """paged_attention that also returns lse, float32 [num_q_tokens, num_heads]: the log of
    each row's sum of exp(score) (-inf, with out 0, for a row that saw no key). causal=False:
    every row of sequence i sees all seq_lens[i] keys (a shared prefix's pass)."""
    return _ops.paged_attention_lse(query, key_cache, value_cache, block_table, seq_lens,
                                    query_start_loc, scale, alibi_slopes, sliding_window,
                                    softcap, k_scale, v_scale, causal)


@_register_fake("paged_attention_lse")
def _(query, key_cache, value_cache, block_table, seq_lens, query_start_loc, scale,
      alibi_slopes=None, sliding_window=-1, softcap=0.0, k_scale=None, v_scale=None,
      causal=True):
    torch._check(query.dim() == 3, lambda: "paged_attention_lse: query must be 3-D")
    torch._check(query.shape[2] == key_cache.shape[3],
                 lambda: "paged_attention_lse: query head_size must equal key_cache.size(3)")
    torch._check(query_start_loc.shape[0] == block_table.shape[0] + 1,
                 lambda: "paged_attention_lse: query_start_loc must have num_seqs + 1 entries")
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    lse = torch.empty(query.shape[:2], dtype=torch.float32, device=query.device)
    return out, lse


def merge_attn_states(out_a: Tensor, lse_a: Tensor, out_b: Tensor,
                      lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Combines two attentions of the same rows over disjoint keys, out_* [T, H, D] with
    lse_* float32 [T, H], into the attention over both: (out in out_a's dtype, lse)."""
    return _ops.merge_attn_states(out_a, lse_a, out_b, lse_b)


@_register_fake("merge_attn_states")
def _(out_a, lse_a, out_b, lse_b):
    torch._check(out_a.dim() == 3 and lse_a.dim() == 2,
                 lambda: "merge_attn_states: out_a must be 3-D and lse_a 2-D")
    out = torch.empty(out_a.shape, dtype=out_a.dtype, device=out_a.device)
    lse = torch.empty(out_a.shape[:2], dtype=torch.float32, device=out_a.device)
    return out, lse


def copy_blocks(key_caches: Sequence[Tensor], value_caches: Sequence[Tensor],
                block_mapping: Tensor) -> None:
    """Copies block src to block dst in every layer's caches for each row (src, dst) of
    block_mapping (int64 [n, 2]; destinations distinct)."""
    _ops.copy_blocks(list(key_caches), list(value_caches), block_mapping)


@_register_fake("copy_blocks")
def _(key_caches, value_caches, block_mapping):
    torch._check(len(key_caches) == len(value_caches),
                 lambda: "copy_blocks: key_caches and value_caches must have as many layers")
    return None


def swap_blocks(src: Tensor, dst: Tensor, block_mapping: Tensor) -> None:
    """Copies src[s] into dst[d] for each row (s, d) of block_mapping; src and dst may be on
    different devices (GPU cache <-> pinned CPU cache)."""
    _ops.swap_blocks(src, dst, block_mapping)


@_register_fake("swap_blocks")
def _(src, dst, block_mapping):
    return None
