"""What a stored KV block is only valid for: the cache layout and the model.

The disk tier outlives the engine, so a block written by one engine may be read by
another: it must be the same model (same weights, not just the same architecture) and
the same cache layout (dtype, block size, layers, KV heads, head size), or its bytes
mean something else. cache_identity() digests all of these into 32 bytes that name the
tier's directory and open every block file's header (tiers/block_file.py).

Our engine holds the model and samples its parameters (model_fingerprint). vLLM's
scheduler never sees the weights, so there the model is named by its checkpoint files
(checkpoint_fingerprint), which scheduler and workers read alike.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ..cache.kv_cache import KVCache

_SAMPLES = 256  # values read per parameter: any retraining or reseeding changes them
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
CONFIG_FILES = ("config.json", "params.json")
_FILE_SAMPLES = 16  # evenly spaced reads per weight file, the first at 0, the last at the end
_SAMPLE_BYTES = 1 << 16


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


def checkpoint_fingerprint(directory: str | os.PathLike) -> bytes:
    """A digest of a checkpoint directory's config and weight files: each file's name,
    size and 16 evenly spaced 64 KiB samples of its bytes (the first at its start, so a
    safetensors header with every tensor's name, shape and offsets is in it; the last
    at its end). A retrained or re-quantized checkpoint changes it; reading it costs at
    most 1 MiB per file."""
    root = Path(directory)
    names = sorted(p for p in root.rglob("*") if p.is_file() and (
        p.name in CONFIG_FILES or p.suffix in WEIGHT_SUFFIXES))
    if not any(p.suffix in WEIGHT_SUFFIXES for p in names):
        raise FileNotFoundError(f"{root} holds no weight file ({', '.join(WEIGHT_SUFFIXES)})")
    h = hashlib.sha256(b"pagedkv-checkpoint-v1\x00")
    for path in names:
        size = path.stat().st_size
        h.update(f"{path.relative_to(root).as_posix()}:{size}\x00".encode())
        with open(path, "rb") as f:
            if size <= _FILE_SAMPLES * _SAMPLE_BYTES:
                h.update(f.read())
                continue
            span = size - _SAMPLE_BYTES
            for i in range(_FILE_SAMPLES):
                f.seek(span * i // (_FILE_SAMPLES - 1))
                h.update(f.read(_SAMPLE_BYTES))
    return h.digest()
