"""A scored dataset as a Hub dataset folder: the rows with their BN scores, a card, plots, ``scores.json``.

Layout (identical locally and on the Hub)::

    data/train-00000-of-0000N.parquet      kept rows: the source columns + index, bn_score, bn_layer_scores
    data/rejected-00000-of-0000M.parquet   rows a filter dropped (only with a filter)
    README.md                              card: the score's definition, model, histogram, previews
    scores.json                            settings, threshold, counts, quantiles, unreadable rows
    histogram.png, most_typical.png, least_typical.png

Rows are read a second time from the source, ``shard_size`` at a time (constant memory, streamed
datasets included), and keep their order. Unreadable rows are in no split: ``scores.json`` and the card
list them. Nothing timing-dependent is written, so the same inputs give the same bytes.

:class:`ImageScores`, what :func:`~hub_dfq.audit.images.score_images` returns, is defined here beside the
writer its ``save_pretrained`` calls, which reads it in turn: one module, not two that import each other.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from huggingface_hub import DatasetCard, DatasetCardData
from PIL import Image

from .. import __version__
from ..data import ImageData, decode_image
from ..errors import ConfigError, PublishError
from ..outputs import reserve_folder, staged
from ..publish import push_folder
from .registry import DIVERGENCES
from .report import json_safe

__all__ = ["ImageScores", "write_scored_folder", "push_scored_folder", "SCORE_COLUMNS", "PREVIEW_COUNT"]

SCORE_COLUMNS = ("index", "bn_score", "bn_layer_scores")
PREVIEW_COUNT = 16
ROW_GROUP_SIZE = 100
SCORE_DEFINITION = ("per BN layer, the channel mean of `{formula}` between the image's own per-channel spatial "
                    "mean and variance at the layer's input and the layer's running statistics; the image's "
                    "score is the geometric mean over the {n} BN layers (higher = less like the training data)")


@dataclass
class ImageScores:
    """The scores of one dataset.

    Args:
        model: provenance of the model (spec, repo, revision, BN layer names).
        dataset: the dataset spec; ``split`` the split read.
        metric: the per-channel divergence.
        indices: dataset row of every scored image, increasing.
        scores: ``(N,)`` float64 score of each scored image.
        layer_scores: ``(N, layers)`` float32 per-layer parts of each score.
        n_skipped: unreadable rows (not scored); ``skipped`` lists the first ones (``index``, ``error``).
        threshold: the calibrated threshold (``value``, ``fpr``, ``calibration``, ``images``, ...), or ``None``.
        selection: the filter applied (``rule``, ``value``, ``kept``, ``rejected``), or ``None``.
        timing: wall time and images per second of the scoring pass.
        data: the dataset that was scored: the rows :meth:`save_pretrained` writes (``None`` when built by hand).

    :meth:`save_pretrained` and :meth:`push_to_hub` write the Hub dataset folder that ``score_images(out_dir=...,
    push_to_hub=...)`` writes (see the module docstring), byte for byte.
    """

    model: dict[str, Any]
    dataset: str
    split: str | None
    metric: str
    indices: list[int]
    scores: np.ndarray
    layer_scores: np.ndarray
    n_skipped: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    threshold: dict[str, Any] | None = None
    selection: dict[str, Any] | None = None
    timing: dict[str, float] = field(default_factory=dict)
    data: ImageData | None = field(default=None, repr=False, compare=False)

    @property
    def n_images(self) -> int:
        return len(self.indices)

    @property
    def definition(self) -> str:
        return SCORE_DEFINITION.format(formula=DIVERGENCES.get(self.metric).formula if self.metric in DIVERGENCES
                                       else self.metric, n=len(self.model.get("bn_layers", [])))

    def keep_mask(self) -> np.ndarray:
        """Which scored images the selection keeps (all of them without one)."""
        if self.selection is None:
            return np.ones(self.n_images, dtype=bool)
        return self.scores <= self.selection["max_score"]

    def kept_indices(self) -> list[int]:
        """Dataset rows of the kept images."""
        mask = self.keep_mask()
        return [i for i, keep in zip(self.indices, mask) if keep]

    def order(self) -> np.ndarray:
        """Positions of the scored images from most typical (lowest score) to least; ties by row."""
        return np.lexsort((np.asarray(self.indices), self.scores))

    def summary(self) -> dict[str, Any]:
        """Counts, quantiles and the threshold, JSON-ready."""
        q = (np.quantile(self.scores, [0.05, 0.25, 0.5, 0.75, 0.95]).tolist() if self.n_images else [None] * 5)
        return {"n_images": self.n_images, "n_skipped": self.n_skipped,
                "quantiles": dict(zip(["p05", "p25", "median", "p75", "p95"], q)),
                "threshold": self.threshold, "selection": self.selection}

    def to_dict(self) -> dict[str, Any]:
        """Everything but the per-image arrays (``scores.json`` of an output folder)."""
        return {"model": self.model, "dataset": self.dataset, "split": self.split, "metric": self.metric,
                "definition": self.definition, **self.summary(), "skipped": self.skipped, "timing": self.timing}

    # ---- as a Hub dataset ------------------------------------------------------------------------
    def _source(self, data: ImageData | None) -> ImageData:
        source = data if data is not None else self.data
        if source is None:
            raise ConfigError("these scores do not hold the dataset they scored: pass it, e.g. "
                              f"`save_pretrained(DIR, data=hub_dfq.load_images({self.dataset!r}))`")
        return source

    def save_pretrained(self, out_dir: str | os.PathLike[str], *, overwrite: bool = False, shard_size: int = 1000,
                        repo_id: str | None = None, data: ImageData | None = None) -> Path:
        """Write the scored dataset as a Hub dataset folder (what ``score_images(..., out_dir=DIR)`` writes).

        Split ``train`` holds the kept rows with ``index``, ``bn_score`` and ``bn_layer_scores`` columns,
        ``rejected`` the filtered-out ones; ``README.md``, ``scores.json`` and plots beside them. Read it
        back with ``datasets.load_dataset(DIR)``.

        Args:
            out_dir: new or empty, or (with ``overwrite``) a scored dataset hub-dfq wrote.
            overwrite: replace a scored dataset hub-dfq wrote in ``out_dir`` (other files are kept).
            shard_size: rows per parquet shard.
            repo_id: the Hub dataset repo the card's loading snippet names.
            data: the scored dataset, read again for its rows (default: :attr:`data`).

        Raises:
            ConfigError: no dataset to read the rows from.
            OutputExistsError, OutputWriteError, UnsafeOutputError, OutputLockedError: see :mod:`hub_dfq.outputs`.

        Example:
            >>> scores = hub_dfq.score_images("default", "default", keep_fraction=0.9)  # doctest: +SKIP
            >>> scores.save_pretrained("scored")  # doctest: +SKIP
        """
        return write_scored_folder(self, self._source(data), out_dir, overwrite=overwrite, shard_size=shard_size,
                                   repo_id=repo_id)

    def push_to_hub(self, repo_id: str, *, private: bool = False, token: str | bool | None = None,
                    shard_size: int = 1000, data: ImageData | None = None) -> str:
        """Write the scored dataset into a fresh temporary folder and upload it to a Hub dataset repo in one commit.

        The same files as :meth:`save_pretrained` with ``repo_id`` (and ``score_images(..., push_to_hub=repo_id)``).

        Returns:
            The URL of the dataset repo.

        Raises:
            ConfigError: no dataset to read the rows from.
            PublishError: no token, no write access or a failed upload (nothing partial is committed).
        """
        source = self._source(data)
        with tempfile.TemporaryDirectory(prefix="hub-dfq-score-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "scored", shard_size=shard_size, repo_id=repo_id, data=source)
            return push_scored_folder(folder, repo_id, private=private, token=token)


def _features(data: ImageData) -> datasets.Features:
    source = data.dataset.features
    features = {k: v for k, v in source.items() if k not in SCORE_COLUMNS}  # a re-scored dataset: replaced
    if isinstance(features.get(data.image_column), datasets.Image):
        features[data.image_column] = datasets.Image()  # images stay bytes; readers decode them
    features["index"] = datasets.Value("int64")
    features["bn_score"] = datasets.Value("float64")
    features["bn_layer_scores"] = datasets.Sequence(datasets.Value("float32"))
    return datasets.Features(features)


def _embed(cell: Any) -> Any:
    """An image cell with its bytes inside (a local path would not travel with the dataset)."""
    if isinstance(cell, dict) and cell.get("bytes") is None and cell.get("path"):
        return {"bytes": Path(cell["path"]).read_bytes(), "path": Path(cell["path"]).name}
    return cell


def _shard_names(split: str, rows: int, shard_size: int) -> list[str]:
    total = max(1, math.ceil(rows / shard_size))
    return [f"data/{split}-{i:05d}-of-{total:05d}.parquet" for i in range(total)]


class _ShardWriter:
    def __init__(self, folder: Path, split: str, rows: int, shard_size: int, features: datasets.Features) -> None:
        self.folder, self.features, self.shard_size = folder, features, shard_size
        self.names = _shard_names(split, rows, shard_size)
        self.buffer: list[dict[str, Any]] = []
        self.written = 0
        self.bytes = 0

    def add(self, row: dict[str, Any]) -> None:
        self.buffer.append(row)
        if len(self.buffer) == self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.buffer and self.written:
            return
        path = self.folder / self.names[self.written]
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(self.buffer, schema=self.features.arrow_schema)
        pq.write_table(table, path, row_group_size=ROW_GROUP_SIZE, compression="snappy", write_statistics=True,
                       store_schema=True)
        self.bytes += path.stat().st_size
        self.written += 1
        self.buffer = []


def _write_rows(folder: Path, result: ImageScores, data: ImageData, shard_size: int) -> dict[str, Any]:
    """Second pass over the source: every scored row into its split; returns shard facts and preview cells."""
    features = _features(data)
    where = {row: i for i, row in enumerate(result.indices)}
    keep = result.keep_mask()
    order = result.order()
    n_preview = min(PREVIEW_COUNT, len(order))
    most = [result.indices[i] for i in order[:n_preview]]
    least = [result.indices[i] for i in order[::-1][:n_preview]]
    cells: dict[int, tuple] = {}  # row -> (image cell, score, row) of the preview images
    writers = {"train": _ShardWriter(folder, "train", int(keep.sum()), shard_size, features)}
    if result.selection is not None and (~keep).any():
        writers["rejected"] = _ShardWriter(folder, "rejected", int((~keep).sum()), shard_size, features)
    columns = [c for c in features if c not in SCORE_COLUMNS]
    position = 0
    for batch in data.dataset.iter(batch_size=256):
        n = len(batch[data.image_column])
        for j in range(n):
            i = where.get(position)
            if i is not None:
                row = {c: batch[c][j] for c in columns}
                row[data.image_column] = _embed(row[data.image_column])
                row.update(index=position, bn_score=float(result.scores[i]),
                           bn_layer_scores=result.layer_scores[i].tolist())
                writers["train" if keep[i] else "rejected"].add(row)
                if position in most or position in least:
                    cells[position] = (row[data.image_column], float(result.scores[i]), position)
            position += 1
    for writer in writers.values():
        writer.flush()
    previews = {"most": [cells[r] for r in most], "least": [cells[r] for r in least]}
    return {"splits": {s: {"files": w.names, "rows": int(keep.sum()) if s == "train" else int((~keep).sum()),
                           "bytes": w.bytes} for s, w in writers.items()}, "previews": previews,
            "features": features}


def _grid(items: list, path: Path, *, cell: int = 96) -> None:
    """Thumbnails (fitted into ``cell`` px squares), 8 per row, as a PNG."""
    images = []
    for item in items:
        if item is None:
            continue
        try:
            image = decode_image(item[0]).convert("RGB")
        except Exception:  # noqa: BLE001 - a scored image decoded once; a preview is never worth a failed run
            continue
        scale = cell / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.NEAREST if scale > 1 else Image.BILINEAR)
        images.append(image)
    cols = max(1, min(8, len(images)))
    rows = max(1, math.ceil(len(images) / cols))
    pad = 2
    grid = Image.new("RGB", (cols * (cell + pad) + pad, rows * (cell + pad) + pad), (255, 255, 255))
    for k, image in enumerate(images):
        x = pad + (k % cols) * (cell + pad) + (cell - image.width) // 2
        y = pad + (k // cols) * (cell + pad) + (cell - image.height) // 2
        grid.paste(image, (x, y))
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG", compress_level=6, optimize=False)
    path.write_bytes(buffer.getvalue())


def _histogram(result: ImageScores, path: Path) -> None:
    from matplotlib.figure import Figure  # why: half a second to import, and only the plot needs it

    fig = Figure(figsize=(6.4, 3.6), dpi=110)
    ax = fig.subplots()
    values = np.log10(np.clip(result.scores, 1e-12, None))
    ax.hist(values, bins=min(60, max(10, len(values) // 10)), color="#4477aa")
    if result.threshold:
        ax.axvline(math.log10(max(result.threshold["value"], 1e-12)), color="#cc3311", linestyle="--",
                   label=f"threshold, fpr {result.threshold['fpr']:g} ({result.threshold['calibration']})")
    if result.selection and result.selection["rule"] != "fpr":
        ax.axvline(math.log10(max(result.selection["max_score"], 1e-12)), color="black", linestyle=":",
                   label=f"kept: score <= {result.selection['max_score']:.4g}")
    if result.threshold or result.selection:
        ax.legend(fontsize=7)
    ax.set_xlabel(f"log10 bn_score ({result.metric})")
    ax.set_ylabel("images")
    ax.set_title(f"{result.n_images} images of {result.dataset} on {result.model.get('spec')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})


def _card(result: ImageScores, written: dict[str, Any], repo_id: str | None) -> DatasetCard:
    splits = written["splits"]
    configs = [{"config_name": "default",
                "data_files": [{"split": s, "path": f"data/{s}-*"} for s in splits]}]
    total = sum(v["bytes"] for v in splits.values())
    card_data = DatasetCardData(
        pretty_name=f"{result.dataset} scored by {result.model.get('repo_id') or result.model.get('spec')}",
        tags=["hub-dfq", "bn-score", "data-audit"], configs=configs,
        dataset_info={"splits": [{"name": s, "num_bytes": v["bytes"], "num_examples": v["rows"]}
                                 for s, v in splits.items()], "download_size": total, "dataset_size": total})
    previews = {kind: [(p[2], p[1]) for p in items if p] for kind, items in written["previews"].items()}
    sel = result.selection
    return DatasetCard.from_template(
        card_data, template_path=str(resources.files("hub_dfq") / "model_cards" / "scored_dataset_card.md"),
        pretty_name=card_data.pretty_name, result=result, summary=json_safe(result.summary()),
        definition=result.definition, splits=splits, previews=previews, selection=sel,
        threshold=result.threshold, hub_dfq_version=__version__, load_path=repo_id or "PATH/TO/THIS/FOLDER",
        model_name=result.model.get("repo_id") or result.model.get("spec"), model_url=result.model.get("url"),
        skipped=result.skipped[:20])


def write_scored_folder(result: ImageScores, data: ImageData, out_dir, *, overwrite: bool = False,
                        shard_size: int = 1000, repo_id: str | None = None) -> Path:
    """Write ``result`` (rows read again from ``data``) as the dataset folder ``out_dir`` (see the module docstring).

    Raises:
        OutputExistsError, OutputWriteError, UnsafeOutputError, OutputLockedError: see :mod:`hub_dfq.outputs`.
    """
    with reserve_folder(out_dir, kind="scores", overwrite=overwrite) as out:
        with staged(out) as folder:
            written = _write_rows(folder, result, data, shard_size)
            _histogram(result, folder / "histogram.png")
            _grid(written["previews"]["most"], folder / "most_typical.png")
            _grid(written["previews"]["least"], folder / "least_typical.png")
            facts = {k: v for k, v in result.to_dict().items() if k != "timing"}  # same inputs, same bytes
            if facts.get("threshold"):
                facts["threshold"] = {k: v for k, v in facts["threshold"].items() if k != "wall_time_s"}
            facts["splits"] = written["splits"]
            facts["hub_dfq_version"] = __version__
            (folder / "scores.json").write_text(json.dumps(json_safe(facts), indent=2, sort_keys=True) + "\n")
            (folder / "README.md").write_text(str(_card(result, written, repo_id)))
        return out.path


def push_scored_folder(folder, repo_id: str, *, private: bool = False, token: str | bool | None = None) -> str:
    """Upload a scored dataset folder to a Hub dataset repo in one commit; returns its URL."""
    folder = Path(folder)
    if not (folder / "scores.json").is_file():
        raise PublishError(f"{folder} is not a scored dataset folder (no scores.json): score the dataset first")
    return push_folder(folder, repo_id, repo_type="dataset", private=private, token=token,
                       commit_message=f"Upload BN-scored dataset {folder.name} (hub-dfq)").url
