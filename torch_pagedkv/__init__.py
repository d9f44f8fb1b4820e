"""torch_pagedkv: a paged KV cache as real PyTorch custom ops (torch.ops.pagedkv.*).

`import torch_pagedkv` loads the ops and the small Python layer (wrappers, reference,
BlockManager, KVCache, PagedAttention). The engine, the Hugging Face integrations and
the CUDA tuning tools load on first use (`torch_pagedkv.engine`, ...).
"""
import importlib

from . import _launch_configs, ops, reference  # noqa: F401  (_launch_configs: registers)
from ._load import HAS_CUDA_KERNELS
from .cache import BlockManager, BlockTable, NoFreeBlocksError, StepPlanner
from .cache.kv_cache import KVCache
from .layers import AttentionMetadata, CascadeMetadata, PagedAttention, write_and_attend
from .ops import (copy_blocks, merge_attn_states, paged_attention, paged_attention_lse,
                  reshape_and_cache, swap_blocks)

_LAZY_SUBMODULES = ("engine", "integrations", "tuning", "knobs", "showcase")

__all__ = [
    "ops", "reference", "HAS_CUDA_KERNELS", *_LAZY_SUBMODULES,
    "reshape_and_cache", "paged_attention", "paged_attention_lse", "merge_attn_states",
    "copy_blocks", "swap_blocks",
    "BlockManager", "BlockTable", "NoFreeBlocksError", "KVCache", "StepPlanner",
    "AttentionMetadata", "CascadeMetadata", "PagedAttention", "write_and_attend",
]


def __getattr__(name: str):
    """Loads a heavy submodule on first use (PEP 562)."""
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
