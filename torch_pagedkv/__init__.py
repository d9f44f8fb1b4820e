"""torch_pagedkv: a paged KV cache as real PyTorch custom ops (torch.ops.pagedkv.*)."""
from . import ops, reference
from ._load import HAS_CUDA_KERNELS
from .ops import copy_blocks, paged_attention, reshape_and_cache, swap_blocks

__all__ = [
    "ops", "reference", "HAS_CUDA_KERNELS",
    "reshape_and_cache", "paged_attention", "copy_blocks", "swap_blocks",
]

try:  # the BlockManager (cache/) lands beside the ops
    from .cache import BlockManager, NoFreeBlocksError  # noqa: F401
    __all__ += ["BlockManager", "NoFreeBlocksError"]
except ImportError:
    pass

from .cache.kv_cache import KVCache  # noqa: E402
from .layers import AttentionMetadata, PagedAttention  # noqa: E402
from . import engine  # noqa: E402  (LLM, SamplingParams)

__all__ += ["KVCache", "AttentionMetadata", "PagedAttention", "engine"]
