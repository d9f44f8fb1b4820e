"""Plain-PyTorch implementations of every pagedkv op, with the exact semantics of
docs/design.md §2. Slow and obvious on purpose: the kernels are tested against these.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _scale(s: Optional[Tensor]) -> float:
    return 1.0 if s is None else float(s.reshape(()).item())


def quantize(x: Tensor, cache_dtype: torch.dtype, scale: Optional[Tensor]) -> Tensor:
    """What a cache of `cache_dtype` stores for values x: fp8 stores round(x / scale),
    saturated to the finite range, NaN as 0; other dtypes store x as is."""
    if cache_dtype not in FP8_DTYPES:
        return x.to(cache_dtype)
    fmax = torch.finfo(cache_dtype).max
    y = (x.float() / torch.tensor(_scale(scale), dtype=torch.float32)).clamp(-fmax, fmax)
    return torch.nan_to_num(y, nan=0.0).to(cache_dtype)


def dequantize(stored: Tensor, scale: Optional[Tensor]) -> Tensor:
    """float32 values a reader sees: stored * scale for fp8, stored otherwise."""
    if stored.dtype in FP8_DTYPES:
        return stored.float() * _scale(scale)
    return stored.float()


def reshape_and_cache(key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor,
                      slot_mapping: Tensor, k_scale: Optional[Tensor] = None,
                      v_scale: Optional[Tensor] = None) -> None:
    """Writes token i's K/V at slot slot_mapping[i] (block slot // block_size, offset
    slot % block_size); negative slots are skipped."""
    block_size = key_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, offsets] = quantize(key[keep], key_cache.dtype, k_scale)
    value_cache[blocks, offsets] = quantize(value[keep], value_cache.dtype, v_scale)


def gather_sequence(cache: Tensor, block_table_row: Tensor, seq_len: int) -> Tensor:
    """The first seq_len cache rows of one sequence: [seq_len, num_kv_heads, head_size]."""
    block_size = cache.shape[1]
    pos = torch.arange(seq_len)
    blocks = block_table_row[pos // block_size].long()
    return cache[blocks, pos % block_size]


def paged_attention(query: Tensor, key_cache: Tensor, value_cache: Tensor, block_table: Tensor,
                    seq_lens: Tensor, query_start_loc: Tensor, scale: float,
                    alibi_slopes: Optional[Tensor] = None, sliding_window: int = -1,
                    softcap: float = 0.0, k_scale: Optional[Tensor] = None,
                    v_scale: Optional[Tensor] = None) -> Tensor:
    """Causal attention of each sequence's query rows over its paged K/V (float32 math)."""
    return paged_attention_lse(query, key_cache, value_cache, block_table, seq_lens,
                               query_start_loc, scale, alibi_slopes, sliding_window, softcap,
                               k_scale, v_scale)[0]


def paged_attention_lse(query: Tensor, key_cache: Tensor, value_cache: Tensor,
                        block_table: Tensor, seq_lens: Tensor, query_start_loc: Tensor,
                        scale: float, alibi_slopes: Optional[Tensor] = None,
                        sliding_window: int = -1, softcap: float = 0.0,
                        k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None,
                        causal: bool = True) -> tuple[Tensor, Tensor]:
    """paged_attention plus each row's log-sum-exp of scores (float32 [Q, H]); a row that
    sees no key gets out 0 and lse -inf. causal=False: every row of sequence i sees all of
    its seq_lens[i] keys (no window, no ALiBi)."""
    if not causal and (sliding_window != -1 or alibi_slopes is not None):
        raise RuntimeError("paged_attention_lse: causal=False needs sliding_window=-1 and "
                           "alibi_slopes=None")
    num_heads = query.shape[1]
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    lse = torch.empty(query.shape[:2], dtype=torch.float32, device=query.device)
    qsl = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        q0, q1 = qsl[i], qsl[i + 1]
        q_len = q1 - q0
        if q_len == 0:
            continue
        if seq_len == 0:  # causal=False over an empty sequence: no key at all
            out[q0:q1] = 0
            lse[q0:q1] = -math.inf
            continue
        k = dequantize(gather_sequence(key_cache, block_table[i], seq_len), k_scale)
        v = dequantize(gather_sequence(value_cache, block_table[i], seq_len), v_scale)
        k = k.repeat_interleave(group, dim=1)  # [L, H, D]
        v = v.repeat_interleave(group, dim=1)
        q = query[q0:q1].float()  # [q_len, H, D]
        s = torch.einsum("qhd,khd->hqk", q, k) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        qpos = torch.arange(seq_len - q_len, seq_len).view(1, q_len, 1)
        kpos = torch.arange(seq_len).view(1, 1, seq_len)
        if alibi_slopes is not None:
            s = s + alibi_slopes.float().view(num_heads, 1, 1) * (kpos - qpos)
        if causal:
            visible = kpos <= qpos
            if sliding_window > 0:
                visible = visible & (kpos > qpos - sliding_window)
            s = s.masked_fill(~visible, -math.inf)
        p = torch.softmax(s, dim=-1)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", p, v).to(query.dtype)
        lse[q0:q1] = torch.logsumexp(s, dim=-1).transpose(0, 1)
    return out, lse


def merge_attn_states(out_a: Tensor, lse_a: Tensor, out_b: Tensor,
                      lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Attention over the union of two disjoint key sets from the two partial attentions:
    weights exp(lse - max); rows where both lse are -inf give out 0 and lse -inf."""
    m = torch.maximum(lse_a, lse_b)
    empty = m == -math.inf
    m_safe = torch.where(empty, torch.zeros_like(m), m)
    w_a = torch.exp(lse_a - m_safe)
    w_b = torch.exp(lse_b - m_safe)
    w = w_a + w_b
    out = (w_a.unsqueeze(-1) * out_a.float() + w_b.unsqueeze(-1) * out_b.float()) / \
        torch.where(empty, torch.ones_like(w), w).unsqueeze(-1)
    out = torch.where(empty.unsqueeze(-1), torch.zeros_like(out), out)
    lse = torch.where(empty, m, m_safe + torch.log(w))
    return out.to(out_a.dtype), lse


def copy_blocks(key_caches: Sequence[Tensor], value_caches: Sequence[Tensor],
                block_mapping: Tensor) -> None:
    """Copies block src to block dst in every layer's caches, for each (src, dst) pair."""
    for src, dst in block_mapping.tolist():
        for cache in list(key_caches) + list(value_caches):
            cache[dst] = cache[src]


def swap_blocks(src: Tensor, dst: Tensor, block_mapping: Tensor) -> None:
    """Copies src[s] to dst[d] for each (s, d) pair; the tensors may be on different devices."""
    for s, d in block_mapping.tolist():
        dst[d] = src[s].to(dst.device)
