"""The tier connector's configuration, as scheduler and workers both derive it from
vLLM's config: the same numbers and identities on every side, no message needed.

kv_connector_extra_config (names fixed; all optional, but at least one tier):
    host_cache_bytes   host-memory tier per worker (an int, or a string like "2GiB")
    disk_cache_dir     the disk tier's directory (shared by instances and restarts)
    disk_cache_bytes   the disk tier's bound, all of this instance's ranks together
                       (default 16 GiB)

A stored block is valid only for one identity: the model (its checkpoint files,
tiers/identity.py checkpoint_fingerprint, and its config), vLLM's cache layout (attention
backend, cache dtype, block size, the layers, KV heads and head size per rank, bytes per
block) and the tensor-parallel rank and size: each rank keeps its own files, under a
directory named by its identity.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

from vllm.logger import init_logger

from torch_pagedkv.tiers.identity import checkpoint_fingerprint
from torch_pagedkv.tiers.protocol import TierWarning
from torch_pagedkv.tiers.disk import DEFAULT_DISK_BYTES

logger = init_logger("vllm.torch_pagedkv")

KEYS = ("host_cache_bytes", "disk_cache_dir", "disk_cache_bytes")
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(name: str, value: Any) -> Optional[int]:
    """An int, a float, or a string like "512MiB" / "2 GB", as bytes (None stays None)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected a byte count, got {value!r}")
    if isinstance(value, (int, float)):
        n = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{name}: expected a byte count like 1073741824 or '1GiB', "
                             f"got {value!r}")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n < 0:
        raise ValueError(f"{name}: expected a byte count >= 0, got {value!r}")
    return n


@dataclass(frozen=True)
class TierConfig:
    block_size: int
    layer_names: tuple[str, ...]
    block_bytes: int  # one block, every layer's K and V, on one rank
    host_cache_bytes: Optional[int]
    disk_cache_dir: Optional[str]
    disk_cache_bytes: int  # per rank
    tp_size: int
    is_fp8: bool
    identities: tuple[bytes, ...]  # per rank

    @property
    def host_slots(self) -> int:
        return (self.host_cache_bytes or 0) // self.block_bytes

    @classmethod
    def from_vllm(cls, vllm_config, kv_cache_config) -> "TierConfig":
        extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
        unknown = sorted(set(extra) - set(KEYS))
        if unknown:
            logger.warning("PagedKVTierConnector: ignoring unknown kv_connector_extra_config "
                           "keys %s (it takes %s)", unknown, ", ".join(KEYS))
        host = parse_bytes("host_cache_bytes", extra.get("host_cache_bytes"))
        disk_dir = extra.get("disk_cache_dir")
        disk_bytes = parse_bytes("disk_cache_bytes", extra.get("disk_cache_bytes"))
        if disk_bytes is not None and disk_dir is None:
            raise ValueError("PagedKVTierConnector: disk_cache_bytes bounds the disk tier: "
                             "give disk_cache_dir too")
        if not host and disk_dir is None:
            raise ValueError("PagedKVTierConnector: no tier configured: give host_cache_bytes "
                             "and/or disk_cache_dir in kv_connector_extra_config")
        spec, layer_names = _full_attention_group(kv_cache_config)
        parallel = vllm_config.parallel_config
        if parallel.pipeline_parallel_size != 1:
            raise ValueError("PagedKVTierConnector: pipeline parallelism is not supported "
                             f"(pipeline_parallel_size={parallel.pipeline_parallel_size})")
        if getattr(vllm_config.cache_config, "calculate_kv_scales", False):
            raise ValueError("PagedKVTierConnector: calculate_kv_scales computes fp8 scales "
                             "at the first forward, so a stored block's scales cannot be "
                             "known before it is loaded: not supported")
        tp = parallel.tensor_parallel_size
        block_bytes = spec.page_size_bytes * len(layer_names)
        if host and host < block_bytes:
            raise ValueError(f"host_cache_bytes={host} holds no KV block: one block of all "
                             f"layers' keys and values takes {block_bytes} bytes per rank")
        per_rank_disk = (DEFAULT_DISK_BYTES if disk_bytes is None else disk_bytes) // tp
        cache_dtype = str(vllm_config.cache_config.cache_dtype)
        layout = (str(vllm_config.attention_config.backend), cache_dtype, str(spec.dtype),
                  spec.block_size, layer_names, spec.num_kv_heads, spec.head_size,
                  getattr(spec, "head_size_v", spec.head_size), spec.page_size_bytes, tp)
        model = model_digest(vllm_config.model_config)
        identities = tuple(
            hashlib.sha256(b"pagedkv-vllm-tier-v1\x00" + repr((layout, rank)).encode()
                           + model).digest() for rank in range(tp))
        return cls(spec.block_size, layer_names, block_bytes, host,
                   None if disk_dir is None else os.fspath(disk_dir), per_rank_disk, tp,
                   cache_dtype.startswith("fp8"), identities)


def _full_attention_group(kv_cache_config):
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(f"PagedKVTierConnector: {len(groups)} KV cache groups (a hybrid "
                         "model); it stores one group of full-attention layers")
    spec = groups[0].kv_cache_spec
    if type(spec) is not FullAttentionSpec or getattr(spec, "sliding_window", None):
        raise ValueError(f"PagedKVTierConnector: {type(spec).__name__} layers; it stores "
                         "full-attention layers only (a sliding window frees the blocks "
                         "a prefix needs)")
    return spec, tuple(groups[0].layer_names)


def model_digest(model_config) -> bytes:
    """The model a block was computed with: its checkpoint files, config and dtype."""
    h = hashlib.sha256()
    config = model_config.hf_config.to_dict()
    h.update(json.dumps({k: v for k, v in config.items() if not k.startswith("_")},
                        sort_keys=True, default=str).encode())
    h.update(repr((str(model_config.dtype), model_config.quantization)).encode())
    path = model_config.model
    if not os.path.isdir(path):
        try:
            from huggingface_hub import snapshot_download
            path = snapshot_download(path, revision=model_config.revision,
                                     local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any failure: fall back to the name
            logger.warning("PagedKVTierConnector: cannot read %s's files (%s); its tier "
                           "blocks are keyed by name and revision only, so new weights "
                           "under the same name are not detected", model_config.model, e)
            h.update(repr((model_config.model, model_config.revision)).encode())
            return h.digest()
    h.update(checkpoint_fingerprint(path))
    return h.digest()


@contextmanager
def logged_tier_warnings():
    """The tiers' TierWarnings (a corrupt file, a full or read-only disk...) as warnings
    in vLLM's log, each naming the file or directory and what is done instead."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TierWarning)
        try:
            yield
        finally:
            for w in caught:
                if issubclass(w.category, TierWarning):
                    logger.warning("PagedKVTierConnector: %s", w.message)
                else:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
