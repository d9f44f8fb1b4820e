"""The CUDA launch-config table: which threads per CTA and decode partition size each
kernel uses, per (GPU name, head size, cache dtype, block size).

The table ships as torch_pagedkv/configs/launch_configs.json (written by `pagedkv tune`);
$PAGEDKV_LAUNCH_CONFIGS may name one more file whose entries win. `install()` validates
both and hands the entries for every GPU to the C++ side (pagedkv::_set_launch_config);
the C++ table runs it once, at its first use (csrc/cuda/launch_config.cpp). A launch
whose key is missing uses the C++ heuristic. The configs change only launch
parameters, never results beyond float rounding, and are looked up from shapes and the
device, never from metadata, so CUDA graphs stay valid.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .._load import HAS_CUDA_KERNELS

VERSION = 1
DTYPES = ("float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")
SPECIALIZED_HEAD_SIZES = (64, 80, 96, 112, 128, 192, 256)
SPECIALIZED_BLOCK_SIZES = (8, 16, 32)
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "configs" / "launch_configs.json"
ENV_PATH = "PAGEDKV_LAUNCH_CONFIGS"


@dataclass(frozen=True)
class LaunchConfig:
    decode_threads: int   # threads per CTA, split-K decode kernel
    partition_size: int   # keys per decode partition
    prefill_threads: int  # threads per CTA, prefill/mixed kernel
    write_threads: int    # threads per CTA, reshape_and_cache

    def error(self) -> str | None:
        """What is wrong with this config, or None. The same rules as config_error in
        csrc/cuda/launch_config.cpp (tests/test_launch_configs.py checks they agree)."""
        if self.decode_threads not in (64, 128, 256):
            return f"decode_threads must be 64, 128 or 256, got {self.decode_threads}"
        if not (64 <= self.partition_size <= 1024 and self.partition_size % 64 == 0):
            return f"partition_size must be a multiple of 64 in [64, 1024], got {self.partition_size}"
        if self.prefill_threads not in (64, 128, 256):
            return f"prefill_threads must be 64, 128 or 256, got {self.prefill_threads}"
        if not (64 <= self.write_threads <= 512 and self.write_threads % 32 == 0):
            return f"write_threads must be a multiple of 32 in [64, 512], got {self.write_threads}"
        return None


@dataclass(frozen=True)
class Entry:
    gpu: str         # torch.cuda.get_device_name(), e.g. "NVIDIA H100 80GB HBM3"
    head_size: int
    dtype: str       # cache dtype, one of DTYPES
    block_size: int
    config: LaunchConfig
    measured: dict = field(default_factory=dict, compare=False)  # what tune timed (info only)

    @property
    def key(self) -> tuple[str, int, str, int]:
        return (self.gpu, self.head_size, self.dtype, self.block_size)


class TableError(ValueError):
    """A launch-config file that does not follow the format below."""


def _entry_from_json(i: int, raw: object, where: str) -> Entry:
    def fail(msg: str) -> TableError:
        return TableError(f"{where}: entries[{i}]: {msg}")

    if not isinstance(raw, dict):
        raise fail(f"must be an object, got {type(raw).__name__}")
    fields = ("gpu", "head_size", "dtype", "block_size", "decode_threads", "partition_size",
              "prefill_threads", "write_threads")
    missing = [f for f in fields if f not in raw]
    if missing:
        raise fail(f"missing {missing}")
    unknown = sorted(set(raw) - set(fields) - {"measured"})
    if unknown:
        raise fail(f"unknown fields {unknown}")
    if not isinstance(raw["gpu"], str) or not raw["gpu"]:
        raise fail(f"gpu must be a non-empty string, got {raw['gpu']!r}")
    for f in fields[1:]:
        if f != "dtype" and (not isinstance(raw[f], int) or isinstance(raw[f], bool)):
            raise fail(f"{f} must be an integer, got {raw[f]!r}")
    if raw["dtype"] not in DTYPES:
        raise fail(f"dtype must be one of {list(DTYPES)}, got {raw['dtype']!r}")
    if not (8 <= raw["head_size"] <= 512 and raw["head_size"] % 8 == 0):
        raise fail(f"head_size must be a multiple of 8 in [8, 512], got {raw['head_size']}")
    if not 1 <= raw["block_size"] <= 256:
        raise fail(f"block_size must be in [1, 256], got {raw['block_size']}")
    config = LaunchConfig(raw["decode_threads"], raw["partition_size"], raw["prefill_threads"],
                          raw["write_threads"])
    if (err := config.error()) is not None:
        raise fail(err)
    measured = raw.get("measured", {})
    if not isinstance(measured, dict):
        raise fail("measured must be an object")
    return Entry(raw["gpu"], raw["head_size"], raw["dtype"], raw["block_size"], config, measured)


def parse(text: str, where: str = "<string>") -> list[Entry]:
    """Entries of a launch-config file: {"version": 1, "entries": [{gpu, head_size, dtype,
    block_size, decode_threads, partition_size, prefill_threads, write_threads,
    measured?}, ...]}. Raises TableError on anything else (duplicate keys included)."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise TableError(f"{where}: not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise TableError(f"{where}: must be an object with \"version\": {VERSION}")
    if not isinstance(doc.get("entries"), list):
        raise TableError(f"{where}: \"entries\" must be a list")
    entries = [_entry_from_json(i, raw, where) for i, raw in enumerate(doc["entries"])]
    seen: dict[tuple, int] = {}
    for i, e in enumerate(entries):
        if e.key in seen:
            raise TableError(f"{where}: entries[{i}] repeats the key of entries[{seen[e.key]}]: {e.key}")
        seen[e.key] = i
    return entries


def load(path: str | os.PathLike = DEFAULT_PATH) -> list[Entry]:
    path = Path(path)
    return parse(path.read_text(), str(path))


def dumps(entries: list[Entry]) -> str:
    rows = []
    for e in sorted(entries, key=lambda e: e.key):
        row = {"gpu": e.gpu, "head_size": e.head_size, "dtype": e.dtype, "block_size": e.block_size,
               **asdict(e.config)}
        if e.measured:
            row["measured"] = e.measured
        rows.append(row)
    return json.dumps({"version": VERSION, "entries": rows}, indent=1) + "\n"


def save(entries: list[Entry], path: str | os.PathLike) -> None:
    Path(path).write_text(dumps(entries))


def merge(old: list[Entry], new: list[Entry]) -> list[Entry]:
    """old with every key that `new` has replaced by new's entry."""
    by_key = {e.key: e for e in old}
    by_key.update({e.key: e for e in new})
    return list(by_key.values())


def apply(entries: list[Entry], ops=None) -> int:
    """Hands the entries to the CUDA kernels (`ops`: torch.ops.pagedkv, or the emulated
    kernels' torch.ops.pagedkv_simt); returns how many (0 without CUDA kernels)."""
    if ops is None:
        if not HAS_CUDA_KERNELS:
            return 0
        ops = torch.ops.pagedkv
    for e in entries:
        c = e.config
        ops._set_launch_config(e.gpu, e.head_size, e.dtype, e.block_size,
                                             c.decode_threads, c.partition_size,
                                             c.prefill_threads, c.write_threads)
    return len(entries)


def lookup(gpu: str, head_size: int, dtype: str, block_size: int,
           ops=None) -> tuple[LaunchConfig, bool]:
    """The config a launch on `gpu` uses for this key, and whether it came from the table
    (else it is the C++ heuristic). Needs a CUDA build of the kernels, not a GPU; `ops`
    as for apply()."""
    if ops is None:
        if not HAS_CUDA_KERNELS:
            raise RuntimeError("torch_pagedkv was built without CUDA kernels: no launch configs")
        ops = torch.ops.pagedkv
    d, p, f, w, from_table = ops._launch_config(gpu, head_size, dtype, block_size)
    return LaunchConfig(d, p, f, w), bool(from_table)


def heuristic(head_size: int, dtype: str, block_size: int, ops=None) -> LaunchConfig:
    """The C++ fallback for keys the table lacks."""
    return lookup("<no gpu: heuristic>", head_size, dtype, block_size, ops)[0]


def install(ops=None) -> int:
    """Loads the shipped table and $PAGEDKV_LAUNCH_CONFIGS and applies them (the C++ table
    calls it once, at its first use; tests call it again to restore the table). A broken
    shipped table is a bug and raises; a broken user file is skipped with a warning so
    that it cannot break a launch."""
    entries = load(DEFAULT_PATH)
    user = os.environ.get(ENV_PATH)
    if user:
        try:
            entries = merge(entries, load(user))
        except (OSError, TableError) as e:
            warnings.warn(f"{ENV_PATH}={user} ignored: {e}", stacklevel=2)
    return apply(entries, ops)
