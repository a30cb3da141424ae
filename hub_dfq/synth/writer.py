"""The output folder: a Hub dataset repository written shard by shard, resumable.

Layout (identical locally and on the Hub)::

    data/train-00000-of-0000N.parquet   columns image (datasets Image, PNG bytes), label (ClassLabel)
    README.md                           dataset card (written last)
    preview.png                         grid of the first images
    generation.json                     arguments, provenance, per-shard records, BN divergences

    .hub-dfq.json                       the files hub-dfq writes here (see hub_dfq.outputs; never pushed)

Shards are deterministic (PNG with fixed settings, fixed row groups, no timestamps in metadata) and
written atomically (a per-process temporary file + rename, :func:`hub_dfq.outputs.write_file`), and
``generation.json`` is rewritten after every shard, so an interrupted run resumes from its finished
shards and never sees half a shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from ..errors import OutputExistsError
from ..outputs import is_temp, write_file, write_text
from .records import record_name

logger = logging.getLogger(__name__)

__all__ = [
    "MANIFEST", "CARD", "PREVIEW", "DATA_DIR", "ROW_GROUP_SIZE", "shard_name", "features_for", "unique_label_names",
    "encode_png", "write_shard", "read_manifest", "write_manifest", "resume_manifest", "file_sha256",
    "finished_shards", "planned_files", "remove_stale_temporaries",
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
    labels = datasets.ClassLabel(names=unique_label_names(label_names))
    return datasets.Features({"image": datasets.Image(), "label": labels})


def encode_png(pixels: torch.Tensor | np.ndarray) -> bytes:
    """``uint8`` ``(C, H, W)`` -> PNG bytes with fixed settings (no metadata chunks, fixed compression)."""
    array = pixels.numpy() if isinstance(pixels, torch.Tensor) else pixels
    array = np.ascontiguousarray(array.transpose(1, 2, 0))
    gray = array.shape[-1] == 1
    image = Image.fromarray(array[..., 0] if gray else array, mode="L" if gray else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6, optimize=False)
    return buffer.getvalue()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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

    write_file(path, write)
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
    write_text(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def planned_files(num_shards: int) -> list[str]:
    """Every file a run of ``num_shards`` shards writes (declared in the folder's marker before it is written),
    the per-shard records of a multi-process run included."""
    return ([shard_name(i, num_shards) for i in range(num_shards)] + [MANIFEST, CARD, PREVIEW]
            + [record_name(i) for i in range(num_shards)])


def remove_stale_temporaries(folder: Path) -> None:
    """Remove hub-dfq temporaries a killed run left (call with the folder's lock held: no live run owns them)."""
    for sub in (folder, folder / DATA_DIR):
        if sub.is_dir():
            for path in sub.iterdir():
                if is_temp(path.name) and path.is_file():
                    path.unlink()


def _differences(stored: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: stored {a!r}, now {b!r}")
    return out


def resume_manifest(folder: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The manifest of the run in ``folder`` to continue, checked to be the run ``identity`` describes.

    Args:
        folder: an output folder holding an earlier (maybe interrupted) run.
        identity: what decides the run's bytes (:func:`hub_dfq.synth.api.run_identity`); must match to resume.

    Raises:
        OutputExistsError: no readable ``generation.json``, or the stored run used other arguments or weights.
    """
    manifest = read_manifest(folder)
    if manifest is None:
        raise OutputExistsError(
            f"cannot resume in {folder}: it has no readable generation.json; pass `overwrite=True` to replace it")
    stored = {"arguments": manifest.get("arguments", {}),
              "weights_sha256": (manifest.get("model") or {}).get("weights_sha256"),
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
