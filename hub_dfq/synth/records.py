"""Per-shard records that every process of a multi-process synthesis writes without racing.

``generation.json`` has one writer, rank 0. Another rank that finishes a shard leaves the shard's
record (the same dict rank 0 would put into ``generation.json``) in its own small file,
``.hub_dfq-records/00003.json``, written atomically; rank 0 merges those files into the manifest
as it goes and once more at the end, then deletes them. A run that is killed keeps them, so
``resume=True`` sees every finished shard, whichever rank made it.

Records carry the run's fingerprint: a record of another run is never merged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

logger = logging.getLogger(__name__)

__all__ = ["RECORDS_DIR", "record_name", "write_record", "read_records", "clear_records", "merge_records"]

RECORDS_DIR = ".hub_dfq-records"


def record_name(index: int) -> str:
    """The record file of shard ``index``, relative to the dataset folder."""
    return f"{RECORDS_DIR}/{index:05d}.json"


def _path(folder: Path, index: int) -> Path:
    return folder / record_name(index)


def write_record(folder: Path, record: dict[str, Any], *, fingerprint: str) -> Path:
    """Leave the record of one finished shard for rank 0 (atomically: a reader sees all of it or nothing)."""
    path = _path(folder, int(record["index"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "record": record}, sort_keys=True))
    os.replace(tmp, path)
    return path


def read_records(folder: Path, *, fingerprint: str) -> list[dict[str, Any]]:
    """The shard records of the run ``fingerprint`` left in ``folder`` (unreadable or foreign ones are skipped)."""
    records = []
    for path in sorted((folder / RECORDS_DIR).glob("[0-9]*.json")):
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError) as err:  # a torn file cannot exist (atomic writes), a foreign one can
            logger.warning("ignoring unreadable shard record %s (%s)", path, err)
            continue
        ours = isinstance(entry, dict) and entry.get("fingerprint") == fingerprint
        if ours and isinstance(entry.get("record"), dict):
            records.append(entry["record"])
    return records


def clear_records(folder: Path) -> None:
    """Delete every shard record (once they are in ``generation.json``, or when a run starts afresh)."""
    shutil.rmtree(folder / RECORDS_DIR, ignore_errors=True)


def merge_records(*groups: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per shard index (the first one seen wins), sorted by index."""
    merged: dict[int, dict[str, Any]] = {}
    for group in groups:
        for record in group:
            merged.setdefault(int(record["index"]), record)
    return [merged[i] for i in sorted(merged)]
