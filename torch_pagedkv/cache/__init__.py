"""Host-side KV-cache bookkeeping: block manager and block hashing."""

from .block_hash import BlockHasher, encode_extra_keys, hash_block, root_hash
from .block_manager import BlockManager, BlockManagerStats, NoFreeBlocksError, SequenceIdError

__all__ = [
    "BlockHasher",
    "BlockManager",
    "BlockManagerStats",
    "NoFreeBlocksError",
    "SequenceIdError",
    "encode_extra_keys",
    "hash_block",
    "root_hash",
]
