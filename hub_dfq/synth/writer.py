"""The output folder: a Hub dataset repository written shard by shard, resumable.

Layout (identical locally and on the Hub)::

    data/train-00000-of-0000N.parquet   columns image (datasets Image, PNG bytes), label (ClassLabel)
    README.md                           dataset card (written last)
    preview.png                         grid of the first images
    generation.json                     arguments, provenance, per-shard records, BN divergences

Shards are deterministic (PNG with fixed settings, fixed row groups, no timestamps in metadata) and
written atomically (temporary file + rename), and ``generation.json`` is rewritten after every
shard, so an interrupted run resumes from its finished shards and never sees half a shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from ..errors import ConfigError, OutputExistsError

logger = logging.getLogger(__name__)

__all__ = [
    "MANIFEST", "CARD", "PREVIEW", "DATA_DIR", "ROW_GROUP_SIZE", "shard_name", "features_for", "unique_label_names", "encode_png",
    "write_shard", "read_manifest", "write_manifest", "prepare_folder", "file_sha256", "finished_shards",
]

MANIFEST = "generation.json"
CARD = "README.md"
PREVIEW = "preview.png"
DATA_DIR = "data"
ROW_GROUP_SIZE = 100  # rows per parquet row group: fixed so reruns are byte-identical (and the Hub viewer pages well)
MANIFEST_FORMAT = 1


def shard_name(index: int, total: int) -> str:
    """``data/train-00003-of-00010.parquet``, the Hub's convention that the viewer understands."""
    return f"{DATA_DIR}/train-{index:05d}-of-{total:05d}.parquet"


def unique_label_names(label_names: Sequence[str]) -> list[str]:
    """The names with their class index appended where a name repeats (ImageNet has two "crane" classes)."""
    counts = Counter(label_names)
    return [f"{name} ({index})" if counts[name] > 1 else name for index, name in enumerate(label_names)]


def features_for(label_names: Sequence[str]) -> datasets.Features:
    # ClassLabel rejects repeated names
    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=unique_label_names(label_names))})


def encode_png(pixels: torch.Tensor | np.ndarray) -> bytes:
    """``uint8`` ``(C, H, W)`` -> PNG bytes with fixed settings (no metadata chunks, fixed compression)."""
    array = pixels.numpy() if isinstance(pixels, torch.Tensor) else pixels
    array = np.ascontiguousarray(array.transpose(1, 2, 0))
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array, mode="L" if array.shape[-1] == 1 else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6, optimize=False)
    return buffer.getvalue()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write_bytes(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows: readers see the old file or the whole new one
    finally:
        if tmp.exists():
            tmp.unlink()


def write_shard(path: Path, pixels: torch.Tensor, labels: torch.Tensor, features: datasets.Features) -> str:
    """Write one shard atomically; returns its sha256.

    Args:
        path: destination ``.parquet`` file.
        pixels: ``uint8`` images ``(N, C, H, W)``.
        labels: class indices ``(N,)``.
        features: the dataset's features (stored in the schema metadata, as ``datasets`` does).
    """
    images = [{"bytes": encode_png(p), "path": None} for p in pixels]
    table = pa.Table.from_pydict(
        {"image": images, "label": [int(v) for v in labels.tolist()]}, schema=features.arrow_schema)

    def write(tmp: Path) -> None:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE, compression="snappy", use_dictionary=["label"],
                       write_statistics=True, store_schema=True)

    _atomic_write_bytes(path, write)
    return file_sha256(path)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's ``generation.json``, or ``None`` if there is none (or it cannot be read, which is logged)."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        logger.warning("%s cannot be read (%s): it is treated as missing", path, err)
        return None
    if not isinstance(manifest, dict):
        logger.warning("%s does not hold a JSON object: it is treated as missing", path)
        return None
    return manifest


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    _atomic_write_bytes(folder / MANIFEST, lambda tmp: tmp.write_text(text))


def _holds_results(folder: Path) -> bool:
    return (folder / MANIFEST).exists() or (folder / CARD).exists() or any((folder / DATA_DIR).glob("*.parquet"))


def _differences(stored: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: stored {a!r}, now {b!r}")
    return out


def prepare_folder(folder: Path, identity: dict[str, Any], *, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Check (and maybe clear) the output folder; returns the manifest to resume from, if any.

    Args:
        folder: output folder.
        identity: what decides the run's bytes (:func:`hub_dfq.synth.api.run_identity`); must match to resume.
        resume: continue a run with the same identity.
        overwrite: delete a previous run's files (other files in the folder are kept).

    Raises:
        OutputExistsError: the folder holds another run and neither flag allows it, or ``resume``
            was asked for a run with different arguments or weights.
    """
    if resume and overwrite:
        raise ConfigError("`resume=True` and `overwrite=True` exclude each other: pick one")
    if not folder.exists() or not _holds_results(folder):
        folder.mkdir(parents=True, exist_ok=True)
        return None
    if overwrite:
        for name in (MANIFEST, CARD, PREVIEW):
            if (folder / name).exists():
                (folder / name).unlink()
        if (folder / DATA_DIR).is_dir():
            shutil.rmtree(folder / DATA_DIR)
        logger.info("removed the previous run in %s (overwrite)", folder)
        return None
    manifest = read_manifest(folder)
    if not resume:
        raise OutputExistsError(
            f"{folder} already holds a synthetic dataset (generation.json, README.md or data/*.parquet): pass "
            f"`resume=True` to continue that run with the same arguments, `overwrite=True` to replace it, or another "
            "`out_dir`")
    if manifest is None:
        raise OutputExistsError(
            f"cannot resume in {folder}: it has shards or a card but no readable generation.json; pass `overwrite=True`")
    stored = {"arguments": manifest.get("arguments", {}), "weights_sha256": manifest.get("model", {}).get("weights_sha256"),
              "algorithm": manifest.get("algorithm"), "device_type": manifest.get("device_type")}
    diffs = _differences(stored, identity)
    if diffs:
        raise OutputExistsError(
            f"cannot resume in {folder}: the stored run used other arguments or model weights ({'; '.join(diffs)}); "
            f"rerun with the stored arguments, pass `overwrite=True`, or pick another `out_dir`")
    return manifest


def finished_shards(folder: Path, manifest: dict[str, Any] | None) -> dict[int, dict[str, Any]]:
    """Shard records whose file exists with the recorded checksum (anything else is regenerated)."""
    if not manifest:
        return {}
    done = {}
    for record in manifest.get("shards", []):
        path = folder / record["file"]
        if path.is_file() and file_sha256(path) == record.get("sha256"):
            done[int(record["index"])] = record
        else:
            logger.warning("shard %s is missing or changed; it will be generated again", record["file"])
    return done
