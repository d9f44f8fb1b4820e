"""PagedAttention: the drop-in attention layer over a paged KV cache.

write_and_attend() is the one place in the package that runs the two ops of a step's
attention, in this order:
  1. reshape_and_cache: write the new tokens' K/V into the cache at metadata.slot_mapping;
  2. paged_attention:   attend each query row over its sequence's cached K/V (which now
     includes the new tokens), causally, through metadata.block_table.
Decode, prefill, chunked prefill, prefill over a cached prefix and mixed batches are
all the same call; the metadata alone says which is which. The PagedAttention module
and every Hugging Face path (integrations/) call it, after their own reshapes.

When the planner found sequences sharing a prefix (metadata.cascade), step 2 is
cascade attention instead (cascade_attention below): each shared prefix is read once
for all of its group's rows, then each sequence's own blocks, and the two partial
results are merged. Sliding-window and ALiBi layers keep plain attention.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import ops
from .metadata import AttentionMetadata, CascadeMetadata


def write_and_attend(query: Tensor, key: Tensor, value: Tensor,
                     kv_cache_layer: tuple[Tensor, Tensor], metadata: AttentionMetadata, *,
                     scale: float, alibi_slopes: Optional[Tensor] = None,
                     sliding_window: int = -1, softcap: float = 0.0,
                     k_scale: Optional[Tensor] = None,
                     v_scale: Optional[Tensor] = None) -> Tensor:
    """Writes key/value [T, num_kv_heads, head_size] into the layer's paged caches at
    metadata.slot_mapping, then attends query [Q, num_heads, head_size] over them;
    returns [Q, num_heads, head_size]. Layouts and semantics: docs/design.md §2."""
    key_cache, value_cache = kv_cache_layer
    ops.reshape_and_cache(key, value, key_cache, value_cache, metadata.slot_mapping,
                          k_scale, v_scale)
    # A window or ALiBi needs each key's distance to the row: no position-free prefix pass.
    if metadata.cascade is not None and alibi_slopes is None and sliding_window <= 0:
        return cascade_attention(query, key_cache, value_cache, metadata.cascade, scale=scale,
                                 softcap=softcap, k_scale=k_scale, v_scale=v_scale)
    return ops.paged_attention(query, key_cache, value_cache, metadata.block_table,
                               metadata.seq_lens, metadata.query_start_loc, scale,
                               alibi_slopes, sliding_window, softcap, k_scale, v_scale)


def cascade_attention(query: Tensor, key_cache: Tensor, value_cache: Tensor,
                      cascade: CascadeMetadata, *, scale: float, softcap: float = 0.0,
                      k_scale: Optional[Tensor] = None,
                      v_scale: Optional[Tensor] = None) -> Tensor:
    """Causal attention of query [Q, num_heads, head_size] over the cache, equal to
    paged_attention over the whole sequences, with each group's shared prefix read once:
    a prefix pass (causal=False, one "sequence" per group holding all of its members'
    rows), a suffix pass (causal, each sequence's own blocks) and a merge by lse. Both
    passes run in cascade order (group members' rows contiguous); the result is put
    back in query order."""
    q = query.index_select(0, cascade.query_order)
    out_p, lse_p = ops.paged_attention_lse(
        q, key_cache, value_cache, cascade.prefix_block_table, cascade.prefix_seq_lens,
        cascade.prefix_query_start_loc, scale, None, -1, softcap, k_scale, v_scale,
        causal=False)
    out_s, lse_s = ops.paged_attention_lse(
        q, key_cache, value_cache, cascade.suffix_block_table, cascade.suffix_seq_lens,
        cascade.suffix_query_start_loc, scale, None, -1, softcap, k_scale, v_scale)
    out, _ = ops.merge_attn_states(out_p, lse_p, out_s, lse_s)
    return out.index_select(0, cascade.query_restore)


class PagedAttention(nn.Module):
    """Attention of new tokens over a paged KV cache (docs/design.md §2).

    q/k/v may be [num_tokens, heads * head_size] or [num_tokens, heads, head_size],
    including strided views into a fused QKV projection: they are viewed, never
    copied. Returns [num_tokens, num_heads * head_size].
    """

    def __init__(self, num_heads: int, head_size: int, num_kv_heads: Optional[int] = None,
                 scale: Optional[float] = None, sliding_window: Optional[int] = None,
                 alibi_slopes: Union[Sequence[float], Tensor, None] = None,
                 softcap: float = 0.0) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of "
                             f"num_kv_heads ({num_kv_heads})")
        if head_size % 8 or not 8 <= head_size <= 512:
            raise ValueError(f"head_size must be a multiple of 8 in [8, 512], got {head_size}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.num_kv_heads = num_kv_heads
        self.scale = float(head_size ** -0.5 if scale is None else scale)
        self.sliding_window = -1 if not sliding_window else int(sliding_window)
        self.softcap = float(softcap or 0.0)
        if alibi_slopes is not None:
            slopes = torch.as_tensor(alibi_slopes, dtype=torch.float32).reshape(-1)
            if slopes.numel() != num_heads:
                raise ValueError(f"alibi_slopes needs one slope per head ({num_heads}), "
                                 f"got {slopes.numel()}")
            self.register_buffer("alibi_slopes", slopes, persistent=False)
        else:
            self.alibi_slopes = None

    def _heads(self, x: Tensor, heads: int, name: str) -> Tensor:
        if x.dim() == 2 and x.shape[1] == heads * self.head_size:
            x = x.unflatten(-1, (heads, self.head_size))  # a view, also of a strided slice
        if x.dim() != 3 or x.shape[1] != heads or x.shape[2] != self.head_size:
            raise ValueError(f"PagedAttention: {name} must be [num_tokens, {heads * self.head_size}]"
                             f" or [num_tokens, {heads}, {self.head_size}], got {tuple(x.shape)}")
        return x

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                kv_cache_layer: tuple[Tensor, Tensor], metadata: AttentionMetadata,
                k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None) -> Tensor:
        """kv_cache_layer: (key_cache, value_cache) [num_blocks, block_size, num_kv_heads,
        head_size]; k_scale/v_scale: float32 one-element tensors for fp8 caches."""
        q = self._heads(query, self.num_heads, "query")
        k = self._heads(key, self.num_kv_heads, "key")
        v = self._heads(value, self.num_kv_heads, "value")
        out = write_and_attend(q, k, v, kv_cache_layer, metadata, scale=self.scale,
                               alibi_slopes=self.alibi_slopes,
                               sliding_window=self.sliding_window, softcap=self.softcap,
                               k_scale=k_scale, v_scale=v_scale)
        return out.flatten(1)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_size={self.head_size}, "
                f"num_kv_heads={self.num_kv_heads}, scale={self.scale:.4g}, "
                f"sliding_window={self.sliding_window}, softcap={self.softcap}, "
                f"alibi={self.alibi_slopes is not None}")
