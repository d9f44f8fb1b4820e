"""Host-side KV-cache bookkeeping: block manager, block hashing, step planning."""

from .block_hash import BlockHasher, encode_extra_keys, hash_block, root_hash
from .block_manager import (BlockManager, BlockManagerStats, BlockTable, NoFreeBlocksError,
                            SequenceIdError)
from .step_plan import StepPlanner
from ..tiers.protocol import BlockKey, BlockTiers, TierWarning

__all__ = [
    "BlockHasher",
    "BlockKey",
    "BlockTiers",
    "BlockManager",
    "BlockManagerStats",
    "BlockTable",
    "NoFreeBlocksError",
    "SequenceIdError",
    "StepPlanner",
    "TierWarning",
    "encode_extra_keys",
    "hash_block",
    "root_hash",
]
