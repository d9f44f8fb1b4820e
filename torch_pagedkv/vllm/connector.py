"""PagedKVTierConnector: torch_pagedkv's host and disk prefix tiers as a vLLM KV connector.

    vllm.LLM(..., kv_transfer_config={
        "kv_connector": "PagedKVTierConnector",
        "kv_connector_module_path": "torch_pagedkv.vllm.connector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"host_cache_bytes": "4GiB",
                                      "disk_cache_dir": "/var/cache/pagedkv",
                                      "disk_cache_bytes": "200GiB"}})

Every full block a request computes is stored (write-through) in the host tier (an LRU
of block copies in each worker) and the disk tier (one checksummed file per block and
rank, tiers/), and a later request whose prefix is there, in this instance, another one
on the same directory or after a restart, gets those blocks copied into its device
blocks instead of computed. The tiers are the ones our engine uses (torch_pagedkv.tiers);
the halves here are tier_scheduler.py (the index and the plan, in vLLM's scheduler) and
tier_worker.py (the copies, in each worker); tier_config.py derives both halves'
numbers and identities from vLLM's config.

Loads are synchronous (before the step's forward) and saves follow the forward in the
same step. A file found bad at load time is reported to vLLM as a failed block, and this
connector sets vLLM's kv_load_failure_policy to "recompute" (a tier miss is never a
request error). Hits are counted in vLLM's own per-request `num_cached_tokens` and
per-source prefix-cache metrics (host and disk separately), and in the connector's
stats (KV Transfer metrics in the log; `vllm:pagedkv_tier_*` Prometheus counters).

Layouts: any attention backend whose per-layer cache has the block as dim 0 of vLLM's
logical view, which covers ours (attention_backend="CUSTOM") and vLLM's CPU_ATTN; the
identity names the backend, so blocks never cross between them. One KV cache group of
full-attention layers (no sliding window, no hybrid models), no pipeline parallelism.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1,
                                                               KVConnectorMetadata,
                                                               KVConnectorRole)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (KVConnectorPromMetrics,
                                                                  KVConnectorStats)
from vllm.logger import init_logger

from .tier_config import TierConfig
from .tier_scheduler import TierMeta, TierScheduler
from .tier_worker import COUNTS, TierWorker, new_counts

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

logger = init_logger("vllm.torch_pagedkv")


@dataclass
class PagedKVTierStats(KVConnectorStats):
    """Blocks moved per interval, summed over workers: host_loaded_blocks,
    disk_loaded_blocks, host_saved_blocks, disk_written_blocks, failed_loads, io_s."""

    def __post_init__(self) -> None:
        if not self.data:
            self.data = new_counts()

    def reset(self) -> None:
        self.data = new_counts()

    def aggregate(self, other: KVConnectorStats) -> "PagedKVTierStats":
        for k in COUNTS:
            self.data[k] = self.data.get(k, 0) + other.data.get(k, 0)
        return self

    def reduce(self) -> dict[str, int | float]:
        return {k: round(v, 4) if k == "io_s" else int(v) for k, v in self.data.items()}

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in COUNTS)


class PagedKVTierPromMetrics(KVConnectorPromMetrics):
    """`vllm:pagedkv_tier_<count>_total` counters, one per PagedKVTierStats count."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.counters = {}
        for k in COUNTS:
            counter = self._counter_cls(name=f"vllm:pagedkv_tier_{k}",
                                        documentation=f"torch_pagedkv tier connector: {k}",
                                        labelnames=labelnames)
            self.counters[k] = {idx: counter.labels(*values)
                                for idx, values in per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for k in COUNTS:
            v = transfer_stats_data.get(k, 0)
            if v:
                self.counters[k][engine_idx].inc(v)


class PagedKVTierConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: Optional["KVCacheConfig"] = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        if kv_cache_config is None:
            raise ValueError("PagedKVTierConnector needs the KV cache config (vLLM >= 0.32)")
        self.cfg = TierConfig.from_vllm(vllm_config, kv_cache_config)
        self.scheduler: Optional[TierScheduler] = None
        self.worker: Optional[TierWorker] = None
        if role == KVConnectorRole.SCHEDULER:
            transfer = vllm_config.kv_transfer_config
            if transfer.kv_load_failure_policy != "recompute":
                logger.info("PagedKVTierConnector: kv_load_failure_policy %r -> 'recompute' "
                            "(a tier block that fails to load is computed)",
                            transfer.kv_load_failure_policy)
                transfer.kv_load_failure_policy = "recompute"
            self.scheduler = TierScheduler(self.cfg)
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
            self.worker = TierWorker(self.cfg, get_tensor_model_parallel_rank(), vllm_config)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a save that does not happen is a later miss

    # ------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register(kv_caches)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        self.worker.load(self._get_connector_metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv has copied every layer already

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata,
                      **kwargs: Any) -> None:
        return  # wait_for_save copies every layer after the forward

    def wait_for_save(self) -> None:
        if self.has_connector_metadata():
            self.worker.save(self._get_connector_metadata())

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_failed()

    def get_kv_connector_stats(self) -> Optional[PagedKVTierStats]:
        if self.worker is None:  # the scheduler asks too: its counts are vLLM's metrics
            return None
        stats = PagedKVTierStats(self.worker.take_stats())
        return None if stats.is_empty() else stats

    @classmethod
    def build_kv_connector_stats(cls, data: Optional[dict[str, Any]] = None):
        return PagedKVTierStats(dict(data) if data else {})

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames,
                           per_engine_labelvalues) -> PagedKVTierPromMetrics:
        return PagedKVTierPromMetrics(vllm_config, metric_types, labelnames,
                                      per_engine_labelvalues)

    # ------------------------------------------------------------ scheduler side
    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        self.scheduler.kv_cache_manager = kv_cache_manager

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        return self.scheduler.matched_tokens(request, num_computed_tokens), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self.scheduler.after_alloc(request, blocks, num_external_tokens)

    def get_external_cache_hit_sources(self, request, num_external_tokens: int):
        return self.scheduler.hit_sources(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        return self.scheduler.build_meta(scheduler_output)

    def update_connector_output(self, connector_output) -> None:
        if connector_output.invalid_block_ids:
            self.scheduler.load_failed(set(connector_output.invalid_block_ids))

    def request_finished(self, request, block_ids: list[int]):
        self.scheduler.finished(request)
        return False, None  # every full block was stored in the step that computed it


__all__ = ["PagedKVTierConnector", "PagedKVTierStats", "TierMeta"]
