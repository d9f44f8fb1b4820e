"""The model protocol the engine drives (torch_pagedkv.engine.LLM).

Any model the engine runs implements it: the tiny Llama in models/llama.py and
the Hugging Face adapter (integrations/hf.py). A forward pass takes the step's new
tokens flattened into one ragged batch (no padding dimension; sequence i owns rows
[metadata.query_start_loc[i], metadata.query_start_loc[i+1])), writes their K/V
into the paged caches and returns their hidden states; compute_logits turns the
hidden states of the rows the engine samples from into float32 logits.

kv_scales (optional keyword): one (k_scale, v_scale) pair of float32 one-element
tensors per layer, used only by fp8 caches (KVCache.kv_scales). None means 1.0.
They are tensors so a scale can change without recompiling the graph. The engine
passes kv_scales only when its cache is fp8, so a model without fp8 support may
leave the parameter out.
"""
from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..layers.metadata import AttentionMetadata

KVCaches = list[tuple[Tensor, Tensor]]  # per layer (key_cache, value_cache)
KVScales = Optional[list[tuple[Tensor, Tensor]]]  # per layer (k_scale, v_scale)


@runtime_checkable
class PagedModel(Protocol):
    num_layers: int
    num_kv_heads: int
    head_size: int
    vocab_size: int
    dtype: torch.dtype

    def forward(self, input_ids: Tensor, positions: Tensor, kv_caches: KVCaches,
                metadata: AttentionMetadata, kv_scales: KVScales = None) -> Tensor:
        """input_ids, positions: int64 [num_tokens]; kv_caches: per layer
        (key_cache, value_cache) [num_blocks, block_size, num_kv_heads, head_size].
        Returns hidden states [num_tokens, hidden_size]."""
        ...

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """hidden [n, hidden_size] -> float32 logits [n, vocab_size]."""
        ...
