"""KVCache: the per-layer key/value cache tensors of docs/design.md §2.

Each layer gets its own contiguous key cache and value cache, shaped
[num_blocks, block_size, num_kv_heads, head_size] (the NHD paged layout), so a
layer's pair can be handed to reshape_and_cache/paged_attention, or to
FlashAttention/FlashInfer, as is. Size it by a block count or by a byte budget.
fp8 caches also get per-layer float32 one-element k_scale/v_scale tensors
(default 1.0): the cache stores x / scale and readers use stored * scale.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import ops

CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16,
                torch.float8_e4m3fn, torch.float8_e5m2)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class KVCache:
    """Per-layer paged key/value caches.

    Give exactly one of num_blocks or memory_bytes (the budget for all layers'
    keys and values; num_blocks is the largest count that fits).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_size: int, block_size: int,
                 *, num_blocks: Optional[int] = None, memory_bytes: Optional[int] = None,
                 dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu",
                 k_scales: Optional[Sequence[float]] = None,
                 v_scales: Optional[Sequence[float]] = None) -> None:
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"cache dtype must be one of {CACHE_DTYPES}, got {dtype}")
        if min(num_layers, num_kv_heads, head_size, block_size) < 1:
            raise ValueError("num_layers, num_kv_heads, head_size and block_size must be >= 1, "
                             f"got {num_layers}, {num_kv_heads}, {head_size}, {block_size}")
        if (num_blocks is None) == (memory_bytes is None):
            raise ValueError("give exactly one of num_blocks or memory_bytes")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        per_block = self.bytes_per_block(num_layers, num_kv_heads, head_size, block_size, dtype)
        if num_blocks is None:
            num_blocks = int(memory_bytes) // per_block
            if num_blocks < 1:
                raise ValueError(f"memory_bytes={memory_bytes} holds no block: one block of "
                                 f"all layers' keys and values takes {per_block} bytes")
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = int(num_blocks)
        shape = (self.num_blocks, block_size, num_kv_heads, head_size)
        # Zeroed, not empty: padding queries read block 0 and must not meet NaN bits.
        self.key_caches = [torch.zeros(shape, dtype=dtype, device=self.device)
                           for _ in range(num_layers)]
        self.value_caches = [torch.zeros(shape, dtype=dtype, device=self.device)
                             for _ in range(num_layers)]
        self.k_scales = self._scales(k_scales, "k_scales")
        self.v_scales = self._scales(v_scales, "v_scales")

    def _scales(self, values: Optional[Sequence[float]], name: str) -> list[Tensor]:
        values = [1.0] * self.num_layers if values is None else list(values)
        if len(values) != self.num_layers:
            raise ValueError(f"{name} needs one value per layer ({self.num_layers}), "
                             f"got {len(values)}")
        return [torch.tensor([float(v)], dtype=torch.float32, device=self.device)
                for v in values]

    @staticmethod
    def bytes_per_block(num_layers: int, num_kv_heads: int, head_size: int, block_size: int,
                        dtype: torch.dtype) -> int:
        """Bytes one block takes across all layers, keys and values."""
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_size * elem

    @property
    def is_fp8(self) -> bool:
        return self.dtype in FP8_DTYPES

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.key_caches) + sum(t.nbytes for t in self.value_caches)

    @property
    def block_bytes(self) -> int:
        """Bytes one block takes across all layers, keys and values."""
        return self.bytes_per_block(self.num_layers, self.num_kv_heads, self.head_size,
                                    self.block_size, self.dtype)

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        """Layer i's (key_cache, value_cache)."""
        return self.key_caches[i], self.value_caches[i]

    @property
    def kv_caches(self) -> list[tuple[Tensor, Tensor]]:
        """Per layer (key_cache, value_cache): what PagedModel.forward takes."""
        return list(zip(self.key_caches, self.value_caches))

    @property
    def kv_scales(self) -> list[tuple[Tensor, Tensor]]:
        """Per layer (k_scale, v_scale), float32 one-element tensors."""
        return list(zip(self.k_scales, self.v_scales))

    def set_scales(self, layer: int, k_scale: float, v_scale: float) -> None:
        """Change a layer's fp8 scales in place (compiled graphs see the new values)."""
        self.k_scales[layer].fill_(k_scale)
        self.v_scales[layer].fill_(v_scale)

    def copy_blocks(self, pairs: Sequence[tuple[int, int]] | Tensor) -> None:
        """Copy block src to dst in every layer, for each (src, dst) pair (copy-on-write)."""
        mapping = torch.as_tensor(pairs, dtype=torch.int64).reshape(-1, 2)
        if mapping.shape[0] == 0:
            return
        if self.device.type == "cuda":  # pinned + non_blocking: no host-device sync
            mapping = mapping.pin_memory().to(self.device, non_blocking=True)
        ops.copy_blocks(self.key_caches, self.value_caches, mapping.to(self.device))

    def __repr__(self) -> str:
        return (f"KVCache(layers={self.num_layers}, blocks={self.num_blocks}, "
                f"block_size={self.block_size}, kv_heads={self.num_kv_heads}, "
                f"head_size={self.head_size}, dtype={self.dtype}, device={self.device}, "
                f"{self.nbytes / 2**20:.1f} MiB)")
