"""The CPU tuning table on disk: one JSON file per CPU identity.

    {"format": "torch_pagedkv cpu tuning", "version": 1,
     "identity": {...identity.CpuIdentity...}, "library": "<id of the kernels measured>",
     "entries": {"<context>": {"choice": {...}, "measured": {...}}}}

Default place: $PAGEDKV_TUNING_DIR, else $XDG_CACHE_HOME/torch_pagedkv/tuning, else
~/.cache/torch_pagedkv/tuning; the file is <identity key>.json. A file that is corrupt
(not JSON, not this format), foreign (another CPU identity: copied from another machine,
or the thread count changed) or stale (another format version, or measured with other
kernels: the library file changed) is ignored with one warning per process and file,
and the engine measures afresh and rewrites it.

Writers: a save takes an exclusive lock (fcntl.flock on <file>.lock), re-reads the file,
merges its entries with the saver's (the saver's win), writes a temporary file in the
same folder, fsyncs it and renames it over the table (os.replace: atomic), so a reader
sees the old table or the new one, never a half-written one, and two processes that
measured different contexts both keep theirs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from .choices import Choice, ChoiceError, choice_from_json, choice_to_json
from .identity import CpuIdentity

FORMAT = "torch_pagedkv cpu tuning"
VERSION = 1
ENV_DIR = "PAGEDKV_TUNING_DIR"
_warned: set[tuple[str, str]] = set()


def default_dir() -> Path:
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "torch_pagedkv" / "tuning"


def default_path(ident: CpuIdentity) -> Path:
    return default_dir() / f"{ident.key}.json"


_library_ids: dict[tuple[str, int, int], str] = {}


def library_id() -> str:
    """Which kernels a measurement was of: a hash of the loaded op library's file (a
    rebuild from changed sources makes every stored choice stale)."""
    from .._load import LIBRARY_PATH
    st = os.stat(LIBRARY_PATH)
    key = (LIBRARY_PATH, st.st_size, st.st_mtime_ns)
    if key not in _library_ids:
        h = hashlib.sha256()
        with open(LIBRARY_PATH, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _library_ids[key] = h.hexdigest()[:16]
    return _library_ids[key]


@dataclass
class Entry:
    choice: Choice
    measured: dict = field(default_factory=dict)  # what was timed, for --show (info only)


class TableError(ValueError):
    """A table file that is corrupt, foreign or stale (the message says which)."""


def parse(text: str, ident: CpuIdentity, library: str, where: str) -> dict[str, Entry]:
    """The entries of a table file's text; TableError saying why it cannot be used."""
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise TableError(f"{where}: corrupt (not JSON: {e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise TableError(f"{where}: corrupt (not a {FORMAT!r} file)")
    if raw.get("version") != VERSION:
        raise TableError(f"{where}: stale (format version {raw.get('version')!r}, this "
                         f"torch_pagedkv reads {VERSION})")
    try:
        theirs = CpuIdentity.from_dict(raw["identity"])
    except (KeyError, TypeError, ValueError) as e:
        raise TableError(f"{where}: corrupt (identity: {e!r})") from None
    if theirs != ident:
        diff = [k for k, v in ident.as_dict().items() if theirs.as_dict().get(k) != v]
        raise TableError(f"{where}: foreign (measured on another CPU identity: {', '.join(diff)} "
                         f"differ: {[theirs.as_dict()[k] for k in diff]} vs "
                         f"{[ident.as_dict()[k] for k in diff]})")
    if raw.get("library") != library:
        raise TableError(f"{where}: stale (measured with other kernels: library "
                         f"{raw.get('library')!r}, loaded {library!r})")
    entries = raw.get("entries")
    if not isinstance(entries, dict):
        raise TableError(f"{where}: corrupt (entries must be an object)")
    out: dict[str, Entry] = {}
    for context, e in entries.items():
        if not isinstance(e, dict) or "choice" not in e:
            raise TableError(f"{where}: corrupt (entry {context!r} has no choice)")
        try:
            out[context] = Entry(choice_from_json(context, e["choice"]),
                                 dict(e.get("measured") or {}))
        except ChoiceError as err:
            raise TableError(f"{where}: corrupt ({err})") from None
    return out


def warn_once(path: Path, problem: str) -> None:
    if (str(path), problem) not in _warned:
        _warned.add((str(path), problem))
        warnings.warn(f"torch_pagedkv CPU tuning: ignoring {problem}; measuring afresh",
                      RuntimeWarning, stacklevel=3)


def load(path: Path, ident: CpuIdentity, library: str) -> dict[str, Entry]:
    """The usable entries of path: {} when it is absent; {} and one warning when it is
    corrupt, foreign or stale."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        warn_once(path, f"{path}: unreadable ({e})")
        return {}
    try:
        return parse(text, ident, library, str(path))
    except TableError as e:
        warn_once(path, str(e))
        return {}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def save(path: Path, ident: CpuIdentity, library: str, entries: dict[str, Entry]) -> Optional[str]:
    """Merges entries into the table at path (atomically, under a lock; see the module
    docstring). Returns None, or why it could not be written (a read-only or full disk
    leaves the process running on its measured choices)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            merged = {}
            try:
                merged = parse(path.read_text(), ident, library, str(path))
            except (FileNotFoundError, TableError):
                pass
            merged.update(entries)
            doc = {"format": FORMAT, "version": VERSION, "identity": ident.as_dict(),
                   "library": library,
                   "entries": {c: {"choice": choice_to_json(e.choice), "measured": e.measured}
                               for c, e in sorted(merged.items())}}
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(doc, f, indent=1)
                    f.write("\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    except OSError as e:
        return f"{path}: not written ({e})"
    return None
