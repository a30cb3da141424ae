"""One loader for every command that reads images: Hub ids, parquet, folders, `datasets` objects.

Images are decoded here, not by `datasets`, so that an unreadable or truncated file is skipped and
counted instead of stopping a run, and so that grayscale, RGBA and odd sizes reach the model's
preprocessing as ordinary PIL images.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator

import datasets
import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from .deprecation import renamed_arguments
from .errors import DatasetError, HubDfqError, ImageDecodeError

logger = logging.getLogger(__name__)

__all__ = ["ImageData", "Batch", "RowMap", "load_images", "iter_batches", "decode_image", "embedded_sample_path",
           "embedded_sample_labels", "label_index", "check_labels"]

IMAGE_COLUMN_NAMES = ("image", "img", "pixel_values", "picture", "photo", "file")
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "class", "target", "category")
SPLIT_PREFERENCE = ("test", "validation", "valid", "val", "train")
_SPELLINGS = ("'default', 'parquet:PATH', a .parquet file, a folder of images or of parquet files, "
              "a Hub dataset id 'ORG/NAME', or a datasets.Dataset")


def embedded_sample_path() -> Path:
    """1,000 labelled images of the CIFAR-10 (JPEG) test split, shipped with the package."""
    return Path(str(resources.files("hub_dfq") / "assets" / "cifar10-test-1k.parquet"))


def embedded_sample_labels() -> list[str]:
    """The class names of the embedded sample (CIFAR-10's), read from its schema."""
    import pyarrow.parquet as pq  # why: only the schema is read, and only here

    features = datasets.Features.from_arrow_schema(pq.read_schema(embedded_sample_path()))
    return list(features["label"].names)


@dataclass(frozen=True)
class RowMap:
    """Where the rows of a part of a dataset sit in the whole: row ``i`` of the part is row
    ``start + (i // block) * stride + i % block`` of the dataset (whole blocks of ``block`` rows, one every
    ``stride`` rows; see :mod:`hub_dfq.partition`)."""

    start: int = 0
    block: int = 1
    stride: int = 1

    def __call__(self, index: int) -> int:
        return self.start + (index // self.block) * self.stride + index % self.block


@dataclass
class ImageData:
    """A dataset of images (and maybe labels), with its columns resolved.

    Args:
        dataset: the ``datasets.Dataset`` or ``IterableDataset`` (images not decoded).
        image_column: column holding the images.
        label_column: column holding integer labels, or ``None``.
        label_names: class names of ``label_column`` when it is a ``ClassLabel``.
        spec: the spec as given, for reports.
        split: the split that was selected.
        rows: for one process's part of a dataset, where its rows sit in the whole dataset (row
            indices in batches and reports are the whole dataset's); ``None`` for a whole dataset.
    """

    dataset: datasets.Dataset | datasets.IterableDataset
    image_column: str
    label_column: str | None
    label_names: list[str] | None
    spec: str
    split: str | None = None
    rows: RowMap | None = None

    @property
    def streaming(self) -> bool:
        return isinstance(self.dataset, datasets.IterableDataset)

    def __len__(self) -> int:
        if self.streaming:
            raise TypeError("a streamed dataset has no known length")
        return len(self.dataset)

    @property
    def num_rows(self) -> int | None:
        return None if self.streaming else len(self.dataset)


@dataclass
class Batch:
    """Preprocessed images of one batch; rows whose image could not be decoded are in ``skipped``."""

    pixel_values: torch.Tensor
    labels: torch.Tensor | None
    indices: list[int]
    skipped: list[tuple[int, str]] = field(default_factory=list)


def _pick_split(dd: dict, split: str | None, spec: str) -> tuple[Any, str]:
    names = list(dd.keys())
    if split is not None:
        if split not in dd:
            raise DatasetError(f"{spec} has no split {split!r}; it has {names}: pass one as `split`")
        return dd[split], split
    for name in SPLIT_PREFERENCE:
        if name in dd:
            return dd[name], name
    return dd[names[0]], names[0]


def _load_checked(spec: str, **kwargs: Any) -> Any:
    """:func:`_load` with what ``datasets`` and pyarrow raise on unusable local data said as a :class:`DatasetError`."""
    try:
        return _load(spec, **kwargs)
    except HubDfqError:
        raise
    except datasets.exceptions.DatasetGenerationError as err:
        cause = err.__cause__ or err
        raise DatasetError(f"cannot read {spec} ({type(cause).__name__}: {cause}): check that it holds parquet "
                           "files or images") from err
    except datasets.data_files.EmptyDatasetError as err:
        raise DatasetError(f"{spec} holds no data files (no parquet files, no images): use {_SPELLINGS}") from err
    except pa.ArrowInvalid as err:
        raise DatasetError(f"{spec} is not a readable parquet file ({err})") from err
    except ValueError as err:
        if "corresponds to no data" in str(err):
            raise DatasetError(f"{spec} is empty: it has no rows") from err
        raise DatasetError(f"cannot load dataset {spec}: {err}") from err


def _load(spec: str, *, split, config, revision, streaming, token, data_dir) -> Any:
    kwargs: dict[str, Any] = {"streaming": streaming}
    if spec == "default":
        return datasets.load_dataset("parquet", data_files={"test": str(embedded_sample_path())}, **kwargs)
    path_text = spec[len("parquet:"):] if spec.startswith("parquet:") else spec
    if spec.startswith("parquet:") or spec.endswith(".parquet"):
        if not any(ch in path_text for ch in "*?[") and not Path(path_text).expanduser().exists():
            raise DatasetError(f"parquet file {path_text} does not exist")
        return datasets.load_dataset("parquet", data_files={split or "train": str(Path(path_text).expanduser())},
                                     **kwargs)
    path = Path(spec).expanduser()
    if path.is_dir():
        return datasets.load_dataset(str(path), name=config, data_dir=data_dir, **kwargs)
    if path.is_file():
        raise DatasetError(f"{spec} is a file but not a .parquet file: use {_SPELLINGS}")
    if os.sep in spec and not path.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
        raise DatasetError(f"dataset folder {spec} does not exist")
    try:
        return datasets.load_dataset(spec, name=config, revision=revision, token=token, data_dir=data_dir, **kwargs)
    except datasets.exceptions.DatasetNotFoundError as err:
        raise DatasetError(f"no dataset {spec!r} (on the Hub or locally): use {_SPELLINGS}") from err
    except (FileNotFoundError, ConnectionError) as err:
        raise DatasetError(f"cannot load dataset {spec!r}: {err}") from err


def _detect_column(features: dict, explicit: str | None, role: str, spec: str, required: bool) -> str | None:
    columns = list(features)
    if explicit is not None:
        if explicit not in features:
            raise DatasetError(f"{spec} has no column {explicit!r}; its columns are {columns}")
        return explicit
    if role == "image":
        typed = [c for c, f in features.items() if isinstance(f, datasets.Image)]
        names = IMAGE_COLUMN_NAMES
    else:
        typed = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
        names = LABEL_COLUMN_NAMES
    if typed:
        return typed[0]
    for name in names:
        if name in features:
            return name
    if required:
        raise DatasetError(
            f"{spec} has no {role} column (looked for an Image feature or one of {list(names)}); its columns are "
            f"{columns}: name it with `{role}_column`"
        )
    return None


@renamed_arguments(config="dataset_config")
def load_images(
    spec: str | os.PathLike[str] | datasets.Dataset | datasets.IterableDataset | datasets.DatasetDict,
    *,
    split: str | None = None,
    dataset_config: str | None = None,
    revision: str | None = None,
    data_dir: str | None = None,
    limit: int | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    streaming: bool = False,
    token: str | bool | None = None,
) -> ImageData:
    """Open a dataset of images for evaluation, calibration or audits.

    Args:
        spec: ``"default"`` (the embedded CIFAR-10 sample), ``"parquet:PATH"`` or a ``.parquet``
            path, a folder (image folder or parquet dataset repo), a Hub dataset id, or a
            ``datasets`` object.
        split: split to use; by default test, then validation, then train.
        dataset_config: dataset configuration name on the Hub (``name`` of ``datasets.load_dataset``).
        revision: Hub revision of the dataset.
        data_dir: sub-folder of the dataset repo.
        limit: use only the first ``limit`` rows.
        image_column: column with images; by default the first ``Image`` feature, or ``img``/``image``.
        label_column: column with labels; by default the first ``ClassLabel``, or ``label``/``labels``.
        streaming: stream rows instead of downloading the whole dataset.
        token: Hub token for private datasets.

    Returns:
        An :class:`ImageData` whose rows :func:`iter_batches` turns into tensors.

    Raises:
        DatasetError: unknown spec, split or column, or an empty dataset.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise DatasetError(f"`limit` must be a positive integer, got {limit!r}")
    dataset_types = (datasets.Dataset, datasets.IterableDataset, datasets.DatasetDict, datasets.IterableDatasetDict)
    if not isinstance(spec, (str, os.PathLike) + dataset_types):
        raise DatasetError(f"a dataset spec must be a string, a path or a datasets object, got "
                           f"{type(spec).__name__}: use {_SPELLINGS}")
    if isinstance(spec, (datasets.Dataset, datasets.IterableDataset)):
        ds, name, chosen = spec, f"<{type(spec).__name__}>", split
    else:
        is_dict = isinstance(spec, (datasets.DatasetDict, datasets.IterableDatasetDict))
        name = "<DatasetDict>" if is_dict else os.fspath(spec)
        loaded = spec if not isinstance(spec, (str, os.PathLike)) else _load_checked(
            name, split=split, config=dataset_config, revision=revision, streaming=streaming, token=token,
            data_dir=data_dir)
        if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
            ds, chosen = _pick_split(loaded, split, name)
        else:
            ds, chosen = loaded, split
    features = ds.features
    if features is None:  # some streamed datasets only learn their features from the first rows
        ds = ds._resolve_features()
        features = ds.features
    image_col = _detect_column(features, image_column, "image", name, required=True)
    label_col = _detect_column(features, label_column, "label", name, required=False)
    is_class_label = label_col is not None and isinstance(features[label_col], datasets.ClassLabel)
    label_names = features[label_col].names if is_class_label else None
    if isinstance(features[image_col], datasets.Image) and features[image_col].decode:
        ds = ds.cast_column(image_col, datasets.Image(decode=False))
    if limit is not None:
        ds = ds.take(limit) if isinstance(ds, datasets.IterableDataset) else ds.select(range(min(limit, len(ds))))
    if isinstance(ds, datasets.Dataset) and len(ds) == 0:
        raise DatasetError(f"{name} (split {chosen}) is empty")
    return ImageData(ds, image_col, label_col, label_names, name, chosen)


def label_index(value: Any, row: int, spec: str) -> int:
    """A stored label -> class index (``-1`` for a missing one); anything but a whole number is refused.

    Raises:
        DatasetError: a text, a fraction, NaN or another non-integer value, naming the row.
    """
    if value is None:
        return -1
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (float, np.floating)) and np.isfinite(value) and float(value).is_integer():
        return int(value)
    shown = repr(value) if not isinstance(value, (dict, bytes)) else f"a {type(value).__name__}"
    raise DatasetError(f"row {row} of {spec} has label {shown[:60]}, which is not a class index: hub-dfq needs "
                       "whole-number labels (or a ClassLabel column); name the column that holds them with "
                       "`label_column`")


def check_labels(data: ImageData, bound: int, *, classes: int | None = None) -> None:
    """Refuse, before any long work, a label column holding anything but class indices ``0..bound-1``.

    Read from the label column alone (no image is decoded). A streamed dataset cannot be read ahead:
    its labels are checked batch by batch as the images are read (:func:`label_index`).

    Args:
        data: the dataset.
        bound: how many label values are valid.
        classes: the model's class count, for the message (default ``bound``).

    Raises:
        DatasetError: no label column, a non-integer label, or one outside ``0..bound-1`` (naming the row).
    """
    classes = bound if classes is None else classes
    if data.label_column is None:
        raise DatasetError(f"{data.spec} has no label column: accuracy needs labels (name the column with "
                           "`label_column`)")
    if data.streaming:
        return
    if _numeric(data):  # whole numbers or floats: only the first suspect goes through the checks below
        column = np.asarray(data.dataset.with_format("numpy")[data.label_column]).reshape(-1)
        candidates: Any = _suspects(column, bound)
    else:  # text, lists, ...: the first value is refused below
        candidates = enumerate(data.dataset[data.label_column])
    for position, value in candidates:
        row = data.rows(position) if data.rows is not None else position
        label = label_index(value, row, data.spec)
        if not 0 <= label < bound:
            what = "has no label" if label == -1 else f"has label {label}"
            raise DatasetError(f"row {row} of {data.spec} {what}, but the model has {classes} classes (labels "
                               f"0-{classes - 1}): pass labelled images of the model's classes (or name the right "
                               "column with `label_column`)")


def _numeric(data: ImageData) -> bool:
    feature = data.dataset.features[data.label_column]
    return isinstance(feature, datasets.ClassLabel) or (
        isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint", "float")))


def _suspects(labels: np.ndarray, bound: int) -> list[tuple[int, Any]]:
    """The first label (position, value) that is not an index below ``bound``, found without a Python loop."""
    labels = labels.reshape(-1)
    if labels.dtype.kind == "f":
        bad = ~np.isfinite(labels) | (labels != np.round(labels)) | (labels < 0) | (labels >= bound)
    else:
        bad = (labels < 0) | (labels >= bound)
    where = np.flatnonzero(bad)
    return [(int(where[0]), labels[where[0]].item())] if len(where) else []


def decode_image(value: Any) -> Image.Image:
    """A stored image cell (bytes/path dict, path, PIL image or array) -> fully loaded PIL image."""
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict):
            if value.get("bytes") is not None:
                image = Image.open(io.BytesIO(value["bytes"]))
            elif value.get("path"):
                image = Image.open(value["path"])
            else:
                raise ImageDecodeError("image cell has neither bytes nor path")
        elif isinstance(value, (str, os.PathLike)):
            image = Image.open(value)
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, np.ndarray):
            image = Image.fromarray(value)
        elif value is None:
            raise ImageDecodeError("missing image")
        else:
            raise ImageDecodeError(f"unsupported image cell of type {type(value).__name__}")
        image.load()  # decode now, so truncated files fail here rather than inside preprocessing
        return image
    except ImageDecodeError:
        raise
    except Exception as err:  # noqa: BLE001 - PIL raises many types for broken files; reported as ImageDecodeError
        raise ImageDecodeError(f"{type(err).__name__}: {err}") from err


def iter_batches(
    data: ImageData,
    preprocess: Callable[[Image.Image], torch.Tensor],
    *,
    batch_size: int = 64,
    skip_errors: bool = True,
) -> Iterator[Batch]:
    """Decode, preprocess and batch the rows of ``data``.

    Unreadable images are skipped and reported in ``Batch.skipped`` (or raised when
    ``skip_errors`` is false). A batch whose images all failed is still yielded, with no rows.
    Row indices are those of the whole dataset (see ``ImageData.rows``).
    """
    position = 0
    for rows in data.dataset.iter(batch_size=batch_size):
        images, labels, indices, skipped = [], [], [], []
        cells = rows[data.image_column]
        row_labels = rows[data.label_column] if data.label_column else [None] * len(cells)
        for cell, label in zip(cells, row_labels):
            index = data.rows(position) if data.rows is not None else position
            try:
                images.append(preprocess(decode_image(cell)))
            except ImageDecodeError as err:
                if not skip_errors:
                    raise ImageDecodeError(f"row {index} of {data.spec}: {err}") from err
                skipped.append((index, str(err)))
            else:
                indices.append(index)
                labels.append(label_index(label, index, data.spec))
            position += 1
        pixels = torch.stack(images) if images else torch.empty(0)
        label_tensor = torch.tensor(labels, dtype=torch.long) if data.label_column else None
        yield Batch(pixels, label_tensor, indices, skipped)
