"""What a stored KV block is only valid for: the cache layout and the model.

The disk tier outlives the engine, so a block written by one engine may be read by
another: it must be the same model (same weights, not just the same architecture) and
the same cache layout (dtype, block size, layers, KV heads, head size), or its bytes
mean something else. cache_identity() digests all of these into 32 bytes that name the
tier's directory and open every block file's header (tiers/block_file.py).
"""
from __future__ import annotations

import hashlib

import torch

from ..cache.kv_cache import KVCache

_SAMPLES = 256  # values read per parameter: any retraining or reseeding changes them


def model_fingerprint(model) -> bytes:
    """A digest of the model's class, config, and every parameter's name, shape, dtype
    and a strided sample of its values (cheap for large models, and a changed weight
    of any trained model changes the sample)."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        h.update(repr(config).encode())
    named = getattr(model, "named_parameters", None)
    for name, p in (named() if named is not None else ()):
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        flat = p.detach().reshape(-1)
        if flat.numel():
            step = max(1, flat.numel() // _SAMPLES)
            sample = flat[::step][:_SAMPLES].to("cpu", torch.float64)
            h.update(sample.numpy().tobytes())
    return h.digest()


def cache_identity(model, kv_cache: KVCache) -> bytes:
    layout = (str(kv_cache.dtype), kv_cache.block_size, kv_cache.num_layers,
              kv_cache.num_kv_heads, kv_cache.head_size)
    h = hashlib.sha256(b"pagedkv-tier-v1\x00" + repr(layout).encode())
    h.update(model_fingerprint(model))
    return h.digest()
