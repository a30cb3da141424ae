"""Where hub-dfq caches what it can recompute, and how to see and free it (``hub-dfq cache list|clear``).

Four kinds of entries, each keyed on :func:`hub_dfq.fingerprint.fingerprint` of what made it:

- ``synth/<method>-<key>/``: synthetic calibration datasets (a Hub dataset folder with ``generation.json``);
- ``audit/<key>.json``: audit reference points;
- ``quantize/<key>/``: saved progress of an interrupted ``reconstruct``/``distill`` run (``*.pt``);
- ``speed/<key>.json``: a device's measured speed for one model shape (:func:`hub_dfq.budget.device_speed`) or
  of one synthesis method on it (:func:`hub_dfq.synth.speed.synthesis_step_seconds`).

Listing and clearing only ever touch entries the cache can prove it wrote: before an entry is first
written, a record ``.<entry>.hub-dfq-entry`` (JSON: kind and entry name) is written beside it
(:func:`record_entry`). A file or folder without its record is never listed or deleted, whatever its
name or shape: other hub-dfq output (an audit report, a checkpoint) or a user's files in the cache
folder are left alone. Every entry is locked while it is written (:mod:`hub_dfq.locks`); clearing
skips an entry a running process holds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import ConfigError, OutputLockedError
from .locks import hold
from .outputs import write_text

logger = logging.getLogger(__name__)

__all__ = ["CACHE_KINDS", "CacheEntry", "cache_root", "list_cache", "clear_cache", "record_entry", "record_path"]

CACHE_KINDS = ("synth", "audit", "quantize", "speed")
RECORD_SUFFIX = ".hub-dfq-entry"


def cache_base() -> Path:
    """``$HUB_DFQ_CACHE``, else ``$HF_HOME/hub_dfq``, else ``$XDG_CACHE_HOME/hub_dfq``, else ``~/.cache/hub_dfq``."""
    if os.environ.get("HUB_DFQ_CACHE"):
        return Path(os.environ["HUB_DFQ_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub_dfq"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "hub_dfq"


def _checked_base() -> Path:
    """:func:`cache_base`, refused if it exists but is not a folder (``HUB_DFQ_CACHE=notes.txt``): listing it said
    "0 entries in notes.txt", as if a file were an empty cache."""
    base = cache_base()
    if base.exists() and not base.is_dir():
        raise ConfigError(f"the cache location {base} is not a folder: point HUB_DFQ_CACHE (or HF_HOME) at a folder")
    return base


def cache_root(kind: str) -> Path:
    """Cache folder of one kind of entry (see the module docstring)."""
    return cache_base() / kind


@dataclass(frozen=True)
class CacheEntry:
    """One cached result."""

    kind: str
    key: str
    path: Path
    bytes: int
    modified: float
    description: str

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "key": self.key, "path": str(self.path), "bytes": self.bytes,
                "modified": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.modified)),
                "description": self.description}


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record_path(path: str | os.PathLike[str]) -> Path:
    """The record of the cache entry ``path`` (see :func:`record_entry`)."""
    path = Path(path)
    return path.parent / f".{path.name}{RECORD_SUFFIX}"


def record_entry(kind: str, path: str | os.PathLike[str]) -> None:
    """Record that the cache writes the entry ``path`` of ``kind``: call before writing it (with its lock held).

    The record is what lets :func:`clear_cache` delete the entry: nothing without one is ever deleted.

    Raises:
        OutputWriteError: the cache folder cannot be written.
    """
    path = Path(path)
    if _recorded(kind, path):
        return
    write_text(record_path(path), json.dumps({"written_by": f"hub-dfq {__version__}", "kind": kind,
                                               "entry": path.name}) + "\n")


def _recorded(kind: str, path: Path) -> bool:
    record = _read_json(record_path(path))
    return record.get("kind") == kind and record.get("entry") == path.name


def _describe(kind: str, path: Path) -> str | None:
    """A one-line description if ``path`` is an entry hub-dfq writes, else ``None``."""
    if kind == "synth" and path.is_dir() and (path / "generation.json").is_file():
        manifest = _read_json(path / "generation.json")
        args = manifest.get("arguments") or {}
        model = (manifest.get("model") or {}).get("spec", "?")
        state = "complete" if manifest.get("complete") else "interrupted"
        return f"{args.get('method', '?')} x {manifest.get('num_rows', '?')} images of {model} ({state})"
    if kind == "audit" and path.is_file() and path.suffix == ".json":
        entry = _read_json(path)
        settings = entry.get("settings") or {}
        return (f"audit reference {settings.get('kind', '?')} ({entry.get('method', '?')}, "
                f"{settings.get('n', '?')} images)")
    if kind == "speed" and path.is_file() and path.suffix == ".json":
        entry = _read_json(path)
        if entry.get("kind") == "device speed":
            return (f"speed of {entry.get('architecture', '?')} on {entry.get('device', '?')}: "
                    f"{1e3 * float(entry.get('seconds_per_image', 0)):.1f} ms per image")
        if entry.get("kind") == "synthesis speed":
            return (f"{entry.get('method', '?')} synthesis speed of {entry.get('architecture', '?')} on "
                    f"{entry.get('device', '?')}: {1e3 * float(entry.get('seconds_per_image_step', 0)):.1f} ms per "
                    "image-step")
        return None
    if kind == "quantize" and path.is_dir() and any(path.glob("*.pt")):
        return "saved progress of " + ", ".join(sorted(p.stem for p in path.glob("*.pt")))
    return None


def list_cache(kinds: tuple[str, ...] | list[str] = CACHE_KINDS) -> list[CacheEntry]:
    """The entries hub-dfq wrote, newest first.

    Raises:
        ConfigError: the cache location is a file.
    """
    _checked_base()
    entries = []
    for kind in kinds:
        root = cache_root(kind)
        if not root.is_dir():
            continue
        for record in root.glob(f".*{RECORD_SUFFIX}"):
            path = root / record.name[1:-len(RECORD_SUFFIX)]
            if not _recorded(kind, path) or not (path.exists() or path.is_symlink()) or path.is_symlink():
                continue
            description = _describe(kind, path)
            if description is not None:
                key = path.stem if path.is_file() else path.name
                entries.append(CacheEntry(kind, key, path, _size(path), path.stat().st_mtime, description))
    return sorted(entries, key=lambda e: e.modified, reverse=True)


def clear_cache(kinds: tuple[str, ...] | list[str] = CACHE_KINDS, *,
                older_than_days: float | None = None) -> list[CacheEntry]:
    """Delete the cache entries of ``kinds`` (those older than ``older_than_days``); returns what was deleted.

    Only entries with the record :func:`record_entry` wrote are deleted (with their record). An entry a
    running hub-dfq process is writing (it holds the entry's lock) is left alone, with a warning.

    Raises:
        ConfigError: ``older_than_days`` is negative or not a finite number.
    """
    if older_than_days is not None and not (isinstance(older_than_days, (int, float))
                                            and 0 <= older_than_days < float("inf")):
        raise ConfigError(f"`older_than_days` must be a number of days, 0 or more, got {older_than_days!r}")
    _checked_base()
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
    removed = []
    for entry in list_cache(kinds):
        if cutoff is not None and entry.modified > cutoff:
            continue
        try:
            with hold(entry.path, what="cache entry"):
                if entry.path.is_dir():
                    shutil.rmtree(entry.path)
                else:
                    entry.path.unlink()
                record_path(entry.path).unlink(missing_ok=True)
        except OutputLockedError as err:
            logger.warning("kept %s: %s", entry.path, err)
            continue
        removed.append(entry)
    return removed
