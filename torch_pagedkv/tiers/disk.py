"""DiskTier: prefix-cache blocks as files (LLM(disk_cache_dir=..., disk_cache_bytes=...)).

One file per full block, named by its salted chain hash, under a subdirectory named by
the cache identity (tiers/identity.py: model, dtype, block size, head layout), in
the format of tiers/block_file.py (checksummed, the whole BlockKey in the header).

- Atomic: a file is written under a unique temporary name, then renamed into place, so
  a reader (this engine or another on the same directory) sees a whole file or none.
  No fsync: a file a crash leaves short fails its checksum and is a miss.
- Never a crash or a wrong answer: a missing file is a miss; an unreadable, truncated,
  corrupted or foreign one is a miss with a TierWarning (and is deleted); a write that
  fails (read-only directory, full disk) stores nothing, with one TierWarning.
- Bounded: when this engine's count of the directory's bytes would pass
  disk_cache_bytes, it rescans the directory and deletes the least recently used files
  (a read touches a file's mtime) down to 90% of the bound. Another engine's writes are
  counted at the next rescan (every RESCAN_WRITES writes at the latest).
- Persistent: the chain hash's root seed lives in the directory too (`hash_seed`,
  created once, atomically), so a fresh engine on the directory names blocks as the one
  that wrote them did; tenants stay apart by their salt, part of every hash.
"""
from __future__ import annotations

import os
import secrets
import time
import warnings
from pathlib import Path
from typing import Optional

from . import block_file
from .protocol import BlockKey, TierWarning

DEFAULT_DISK_BYTES = 16 * 2**30  # disk_cache_bytes when not given
SUFFIX = ".kv"
SEED_FILE = "hash_seed"
SEED_BYTES = 64  # 32 bytes as hex
RESCAN_WRITES = 256
STALE_TMP_S = 600.0  # a temporary file this old belongs to a writer that died


class DiskTier:
    def __init__(self, directory: str | os.PathLike, max_bytes: int, identity: bytes,
                 payload_bytes: int) -> None:
        self.root = Path(directory)
        self.dir = self.root / identity.hex()[:32]
        self.identity = identity
        self.max_bytes = int(max_bytes)
        self.file_budget = self.max_bytes - SEED_BYTES  # the seed file counts too
        self.payload_bytes = payload_bytes
        self._warned: set[str] = set()
        self._writes = 0
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self._warn_once("dir", f"disk tier: cannot create {self.dir} ({e}); no block "
                                   "will be stored there")
        self.nbytes = self._scan()[1]
        self.hash_seed = self._shared_seed()

    # ------------------------------------------------------------ lookups
    def path(self, block_hash: bytes) -> Path:
        return self.dir / (block_hash.hex() + SUFFIX)

    def contains(self, block_hash: bytes) -> bool:
        return os.path.exists(self.path(block_hash))

    def read(self, key: BlockKey, scales: Optional[tuple[float, ...]]) -> Optional[memoryview]:
        """The payload of ``key``'s file if it is whole and exactly ``key``'s, else None
        (with a TierWarning unless the file is simply gone)."""
        path = self.path(key.hash)
        try:
            with open(path, "rb") as f:  # into a writable buffer: torch.frombuffer wants one
                data = bytearray(os.fstat(f.fileno()).st_size)
                del data[f.readinto(data):]  # a file cut short meanwhile: its checksum fails
        except FileNotFoundError:
            return None  # evicted meanwhile (maybe by another engine)
        except OSError as e:
            self._warn(f"disk tier: cannot read {path} ({e}); computing the block instead")
            return None
        try:
            payload = block_file.decode(data, self.identity, key, scales, self.payload_bytes)
        except block_file.BlockFileError as e:
            self._warn(f"disk tier: {path} is not used: {e}; computing the block instead")
            self._unlink(path)
            return None
        try:
            os.utime(path)  # LRU by access
        except OSError:
            pass
        return payload

    def touch_chain(self, hashes: list[bytes]) -> None:
        """Mark a chain's files (given root first) used, each older than its parent by
        1 us, so the LRU deletes a chain's suffix before its prefix: a prefix is never
        gone while a suffix that needs it stays."""
        now = time.time_ns()
        for i, h in enumerate(hashes):
            t = now - 1000 * i
            try:
                os.utime(self.path(h), ns=(t, t))
            except OSError:
                pass  # evicted meanwhile: a miss from here on

    # ------------------------------------------------------------ stores
    def write(self, key: BlockKey, scales: tuple[float, ...], payload: bytes) -> bool:
        """Store ``key``'s block (atomically); False when it was not stored."""
        path = self.path(key.hash)
        if os.path.exists(path):
            return False
        data = block_file.encode(self.identity, key, scales, payload)
        if len(data) > self.file_budget:
            self._warn_once("size", f"disk tier: disk_cache_bytes={self.max_bytes} holds no "
                                    f"block (one takes {len(data)} bytes); nothing is stored")
            return False
        self._writes += 1
        if self._writes % RESCAN_WRITES == 0:  # count what other engines wrote
            self.nbytes = self._scan()[1]
        if self.nbytes + len(data) > self.file_budget:
            self._shrink(min(self.file_budget - len(data), int(0.9 * self.file_budget)))
        tmp = self.dir / f".{key.hash.hex()}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            self._unlink(tmp)
            self._warn_once("write", f"disk tier: cannot write to {self.dir} ({e}); blocks "
                                     "are not stored on disk")
            return False
        self.nbytes += len(data)
        return True

    def _scan(self) -> tuple[list[tuple[float, int, Path]], int]:
        """(mtime, size, path) of every block file, and their total size; deletes the
        temporary files of writers that died."""
        files, total, now = [], 0, time.time()
        try:
            entries = list(os.scandir(self.dir))
        except OSError:
            return [], 0
        for e in entries:
            try:
                st = e.stat()
            except OSError:
                continue  # deleted meanwhile
            if e.name.endswith(SUFFIX):
                files.append((st.st_mtime, st.st_size, Path(e.path)))
                total += st.st_size
            elif e.name.endswith(".tmp") and now - st.st_mtime > STALE_TMP_S:
                self._unlink(Path(e.path))
        return files, total

    def _shrink(self, target: int) -> None:
        """Delete least recently used files until the directory holds <= target bytes."""
        files, total = self._scan()
        for _, size, path in sorted(files):
            if total <= target:
                break
            self._unlink(path)
            total -= size
        self.nbytes = total

    # ------------------------------------------------------------ the hash seed
    def _shared_seed(self) -> Optional[bytes]:
        """The directory's root seed, created if absent (link(2) fails if another engine
        got there first: then both use the first one). None if it cannot be had."""
        path = self.root / SEED_FILE
        for _ in range(2):
            try:
                seed = bytes.fromhex(path.read_text().strip())
                if len(seed) == SEED_BYTES // 2:
                    return seed
                raise ValueError(f"{len(seed)} bytes, expected {SEED_BYTES // 2}")
            except FileNotFoundError:
                pass
            except (OSError, ValueError) as e:
                self._warn_once("seed", f"disk tier: unusable {path} ({e}); blocks stored "
                                        "by this engine are not found after a restart")
                return None
            tmp = self.root / f".{SEED_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            try:
                tmp.write_text(secrets.token_hex(SEED_BYTES // 2))
                os.link(tmp, path)
            except FileExistsError:
                pass  # another engine created it: read that one
            except OSError as e:
                self._warn_once("seed", f"disk tier: cannot create {path} ({e}); blocks "
                                        "stored by this engine are not found after a restart")
                return None
            finally:
                self._unlink(tmp)
        return None

    # ------------------------------------------------------------ helpers
    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            path.unlink()
        except OSError:
            pass

    def _warn(self, msg: str) -> None:
        warnings.warn(msg, TierWarning, stacklevel=3)

    def _warn_once(self, kind: str, msg: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            self._warn(msg)

    def __repr__(self) -> str:
        return f"DiskTier({self.dir}, {self.nbytes / 2**20:.1f} of {self.max_bytes / 2**20:.1f} MiB)"
