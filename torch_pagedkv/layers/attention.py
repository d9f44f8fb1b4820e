"""PagedAttention: the drop-in attention layer over a paged KV cache.

forward() does two things, in this order:
  1. reshape_and_cache: write the new tokens' K/V into the cache at metadata.slot_mapping;
  2. paged_attention:   attend each new token's query over its sequence's cached K/V
     (which now includes the token itself), causally, through metadata.block_table.
Decode, prefill, chunked prefill, prefill over a cached prefix and mixed batches are
all the same call; the metadata alone says which is which.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import ops
from .metadata import AttentionMetadata


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
        key_cache, value_cache = kv_cache_layer
        q = self._heads(query, self.num_heads, "query")
        k = self._heads(key, self.num_kv_heads, "key")
        v = self._heads(value, self.num_kv_heads, "value")
        ops.reshape_and_cache(k, v, key_cache, value_cache, metadata.slot_mapping,
                              k_scale, v_scale)
        out = ops.paged_attention(q, key_cache, value_cache, metadata.block_table,
                                  metadata.seq_lens, metadata.query_start_loc, self.scale,
                                  self.alibi_slopes, self.sliding_window, self.softcap,
                                  k_scale, v_scale)
        return out.flatten(1)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_size={self.head_size}, "
                f"num_kv_heads={self.num_kv_heads}, scale={self.scale:.4g}, "
                f"sliding_window={self.sliding_window}, softcap={self.softcap}, "
                f"alibi={self.alibi_slopes is not None}")
