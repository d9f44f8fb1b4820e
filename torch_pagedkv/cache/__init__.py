"""Host-side KV-cache bookkeeping: block manager, block hashing, step planning."""

from .block_hash import BlockHasher, encode_extra_keys, hash_block, root_hash
from .block_manager import (BlockManager, BlockManagerStats, BlockTable, NoFreeBlocksError,
                            SequenceIdError)
from .step_plan import StepPlanner

__all__ = [
    "BlockHasher",
    "BlockManager",
    "BlockManagerStats",
    "BlockTable",
    "NoFreeBlocksError",
    "SequenceIdError",
    "StepPlanner",
    "encode_extra_keys",
    "hash_block",
    "root_hash",
]
