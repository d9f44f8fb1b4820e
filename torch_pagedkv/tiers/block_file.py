"""The disk tier's file format: one full KV block per file, self-describing, checksummed.

    body = MAGIC | identity (32) | hash (32) | parent hash (32)
         | u32 len(extra) | extra | u32 n | n x int64 token ids
         | u32 m | m x float64 fp8 scales | u64 len(payload) | payload
    file = body | SHA-256(body)

`identity` names the cache layout and the model (tiers/identity.py); the
payload is the block's bytes, per layer the key block then the value block. decode()
returns the payload only if the checksum holds and every header field equals what the
reader asks for, so a truncated, corrupted or foreign file, or one of another model,
cache dtype, block size or tenant, raises BlockFileError and is never restored.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Optional

from .protocol import BlockKey

MAGIC = b"PKVBLK1\n"
_DIGEST = 32


class BlockFileError(ValueError):
    """A block file that must not be restored; the message says why."""


def encode(identity: bytes, key: BlockKey, scales: tuple[float, ...], payload: bytes) -> bytes:
    n, m = len(key.token_ids), len(scales)
    body = b"".join((
        MAGIC, identity, key.hash, key.parent_hash,
        struct.pack("<I", len(key.extra)), key.extra,
        struct.pack(f"<I{n}q", n, *key.token_ids),
        struct.pack(f"<I{m}d", m, *scales),
        struct.pack("<Q", len(payload)), payload,
    ))
    return body + hashlib.sha256(body).digest()


class _Reader:
    def __init__(self, data: memoryview) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise BlockFileError("header runs past the end of the file")
        out = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))


@dataclass(frozen=True)
class BlockFile:
    identity: bytes
    key: BlockKey
    scales: tuple[float, ...]
    payload: memoryview


def parse(data: bytes) -> BlockFile:
    """A whole block file's fields, else BlockFileError (bad magic, checksum, header)."""
    view = memoryview(data)
    if len(view) < len(MAGIC) + _DIGEST or bytes(view[:len(MAGIC)]) != MAGIC:
        raise BlockFileError("not a pagedkv block file (bad magic or too short)")
    body = view[:-_DIGEST]
    if hashlib.sha256(body).digest() != bytes(view[-_DIGEST:]):
        raise BlockFileError("checksum mismatch (truncated or corrupted)")
    r = _Reader(body)
    r.take(len(MAGIC))
    identity = r.take(32)
    got_hash, got_parent = r.take(32), r.take(32)
    extra = r.take(r.unpack("<I")[0])
    (n,) = r.unpack("<I")
    tokens = r.unpack(f"<{n}q")
    (m,) = r.unpack("<I")
    scales = r.unpack(f"<{m}d")
    (size,) = r.unpack("<Q")
    if r.pos + size != len(body):
        raise BlockFileError(f"payload of {len(body) - r.pos} bytes, header says {size}")
    return BlockFile(identity, BlockKey(got_hash, got_parent, tokens, extra), scales,
                     body[r.pos:])


def decode(data: bytes, identity: bytes, key: BlockKey, scales: Optional[tuple[float, ...]],
           payload_bytes: int) -> memoryview:
    """The payload of a file that holds exactly ``key`` for ``identity`` under ``scales``
    (``payload_bytes`` long), else BlockFileError. ``scales`` None: a reader that cannot
    know them (vLLM's scheduler); the worker that restores the block checks them."""
    f = parse(data)
    if f.identity != identity:
        raise BlockFileError("written for another model or cache layout")
    if f.key != key:
        raise BlockFileError("holds another block (tokens, prefix or salt differ)")
    if scales is not None and f.scales != tuple(scales):
        raise BlockFileError("stored under other fp8 scales")
    if len(f.payload) != payload_bytes:
        raise BlockFileError(f"payload of {len(f.payload)} bytes, expected {payload_bytes}")
    return f.payload
