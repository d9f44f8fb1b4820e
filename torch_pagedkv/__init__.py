"""torch_pagedkv: a paged KV cache as real PyTorch custom ops (torch.ops.pagedkv.*)."""
from . import ops, reference
from ._load import HAS_CUDA_KERNELS
from . import tuning  # noqa: F401  (installs the CUDA launch-config table into the kernels)
from .ops import copy_blocks, paged_attention, reshape_and_cache, swap_blocks
from .cache import BlockManager, NoFreeBlocksError
from .cache.kv_cache import KVCache
from .layers import AttentionMetadata, PagedAttention
from . import engine  # LLM, SamplingParams

__all__ = [
    "ops", "reference", "HAS_CUDA_KERNELS", "engine",
    "reshape_and_cache", "paged_attention", "copy_blocks", "swap_blocks",
    "BlockManager", "NoFreeBlocksError", "KVCache", "AttentionMetadata", "PagedAttention",
]
