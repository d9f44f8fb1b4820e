"""Chained SHA-256 identity of full KV-cache blocks.

Block ``i`` of a sequence is named by

    h_i = SHA-256(h_{i-1} || tokens_i || extra)

where ``tokens_i`` are the block's token ids packed as little-endian int64
(8 bytes each, never ``str()``), ``extra`` is the canonical encoding of the
sequence's extra keys (``cache_salt``, adapter id, multimodal ids, ...), and
``h_{-1}`` is a root hash. Because ``h_i`` depends on every earlier block, equal
hashes mean equal prefixes, so a block can be shared only at the position
where its whole prefix matches.

The root is random per process (``os.urandom``), so hashes cannot be predicted
and aimed at from outside, unless a seed is configured: the ``hash_seed``
argument, else the ``PAGEDKV_HASH_SEED`` environment variable. A seed makes
hashes reproducible across runs and machines.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable, Sequence

HASH_SEED_ENV = "PAGEDKV_HASH_SEED"

# Drawn once per process: the default root of every hash chain.
_PROCESS_ROOT = os.urandom(32)

_sha256 = hashlib.sha256


def root_hash(seed: str | bytes | int | None = None) -> bytes:
    """The parent hash of a sequence's first block.

    ``seed`` (or, when it is None, the ``PAGEDKV_HASH_SEED`` environment
    variable) gives a reproducible root; with neither, the per-process random
    root is used.
    """
    if seed is None:
        seed = os.environ.get(HASH_SEED_ENV) or None
    if seed is None:
        return _PROCESS_ROOT
    if isinstance(seed, int):  # hash_seed=0 and PAGEDKV_HASH_SEED=0 agree
        seed = str(seed)
    return _sha256(b"pagedkv-root\x00" + encode_extra_keys((seed,))).digest()


def encode_extra_keys(
    extra_keys: Iterable[object] = (), *, cache_salt: str | None = None
) -> bytes:
    """Canonical, unambiguous bytes for a sequence's extra hash keys.

    Keys may be str, bytes, int, bool, float, None, or tuples/lists of these.
    Each key is type-tagged and length-prefixed, so ``("ab",)`` and
    ``("a", "b")`` differ, and a ``cache_salt`` never equals a plain extra key
    with the same text. No keys and no salt encode to ``b""``.
    """
    out = bytearray()
    if cache_salt is not None:
        out += b"S"
        _encode_key(out, cache_salt)
    for key in extra_keys:
        _encode_key(out, key)
    return bytes(out)


def _encode_key(out: bytearray, key: object) -> None:
    if isinstance(key, bytes):
        data, tag = key, b"b"
    elif isinstance(key, str):
        data, tag = key.encode("utf-8"), b"s"
    elif isinstance(key, bool):  # before int: bool is an int
        data, tag = b"\x01" if key else b"\x00", b"?"
    elif isinstance(key, int):
        data, tag = str(key).encode("ascii"), b"i"
    elif isinstance(key, float):
        data, tag = key.hex().encode("ascii"), b"f"
    elif key is None:
        data, tag = b"", b"n"
    elif isinstance(key, (tuple, list)):
        out += b"t" + struct.pack("<Q", len(key))
        for item in key:
            _encode_key(out, item)
        return
    else:
        raise TypeError(
            f"extra hash key {key!r} has type {type(key).__name__}; use str, "
            "bytes, int, float, bool, None or a tuple of these"
        )
    out += tag + struct.pack("<Q", len(data)) + data


class BlockHasher:
    """Hashes full blocks of one block size (the packing format is built once)."""

    __slots__ = ("block_size", "_pack")

    def __init__(self, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self._pack = struct.Struct(f"<{block_size}q").pack

    def hash_block(
        self, parent_hash: bytes, block_token_ids: Sequence[int], extra: bytes = b""
    ) -> bytes:
        """SHA-256(parent_hash || int64 token ids || extra) of one full block."""
        try:
            payload = self._pack(*block_token_ids)
        except struct.error as e:
            raise ValueError(
                f"a full block needs {self.block_size} int64 token ids, got "
                f"{len(block_token_ids)} ({e})"
            ) from None
        return _sha256(parent_hash + payload + extra).digest()

    def hash_blocks(
        self,
        token_ids: Sequence[int],
        parent_hash: bytes,
        extra: bytes = b"",
        start_block: int = 0,
        num_blocks: int | None = None,
    ) -> list[bytes]:
        """Chained hashes of full blocks ``start_block, start_block+1, ...``.

        ``parent_hash`` is the hash of block ``start_block - 1`` (the root for
        block 0). Stops at the last full block or after ``num_blocks``.
        """
        bs = self.block_size
        end = len(token_ids) // bs
        if num_blocks is not None:
            end = min(end, start_block + num_blocks)
        pack = self._pack
        out = []
        h = parent_hash
        for i in range(start_block, end):
            h = _sha256(h + pack(*token_ids[i * bs : (i + 1) * bs]) + extra).digest()
            out.append(h)
        return out


def hash_block(
    parent_hash: bytes,
    block_token_ids: Sequence[int],
    extra_keys: Iterable[object] = (),
    *,
    cache_salt: str | None = None,
) -> bytes:
    """One-off convenience form: SHA-256(parent, tokens, encoded extra keys).

    Equal to ``BlockHasher(len(block_token_ids)).hash_block(parent,
    block_token_ids, encode_extra_keys(extra_keys, cache_salt=cache_salt))``.
    """
    extra = encode_extra_keys(extra_keys, cache_salt=cache_salt)
    payload = struct.pack(f"<{len(block_token_ids)}q", *block_token_ids)
    return _sha256(parent_hash + payload + extra).digest()
