"""The prefix-cache tiers below the device cache: host memory and disk.

protocol.py      what a block manager asks of them (BlockTiers), BlockKey, TierWarning
identity.py      what a stored block is only valid for (model, cache layout, rank)
block_file.py    one checksummed, self-describing file per block
host.py          the host tier's LRU index (HostIndex) and our engine's HostTier
disk.py          the disk tier (DiskTier): atomic files, bounded, LRU, shared seed
tiered_cache.py  TieredCache: host + disk behind our engine's BlockManager

Both users share this code: our engine (`LLM(host_cache_bytes=, disk_cache_dir=,
disk_cache_bytes=)`, through TieredCache) and vLLM (torch_pagedkv/vllm/connector.py,
`PagedKVTierConnector`). Only protocol.py is imported here: the rest on demand.
"""
from .protocol import BlockKey, BlockTiers, TierWarning

__all__ = ["BlockKey", "BlockTiers", "TierWarning"]
