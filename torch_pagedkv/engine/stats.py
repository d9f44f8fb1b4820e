"""Engine-wide counters, measured from real engine state as steps run."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    num_steps: int = 0
    num_prefill_tokens: int = 0  # prompt (and recompute) tokens computed
    num_decode_tokens: int = 0
    prefill_time_s: float = 0.0  # wall time of steps that computed prefill tokens
    decode_time_s: float = 0.0  # wall time of decode-only steps
    num_decode_step_tokens: int = 0  # tokens those decode-only steps produced
    num_preemptions: int = 0  # sequences preempted, by swap or by recompute
    num_swapped_out: int = 0  # of which swapped out (the rest are recomputed)
    num_swapped_out_blocks: int = 0  # cache blocks copied to the swap space
    num_swapped_in_blocks: int = 0  # swap blocks copied back into the cache
    num_aborted: int = 0  # requests aborted while unfinished
    num_cow_copies: int = 0  # copy-on-write block copies (forks)
    num_cascade_steps: int = 0  # steps whose attention read shared prefixes once (cascade)
    peak_blocks_used: int = 0  # most blocks referenced by live sequences at once
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of which reused (from the KV cache or a tier)
    num_host_hit_tokens: int = 0  # of which restored from the host tier (host_cache_bytes)
    num_disk_hit_tokens: int = 0  # of which restored from the disk tier (disk_cache_dir)
    num_tier_saved_blocks: int = 0  # evicted blocks copied to the host tier
    num_disk_written_blocks: int = 0  # cached blocks written to the disk tier

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0
