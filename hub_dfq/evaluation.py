"""Top-1 / top-5 accuracy of a model on a labelled image dataset."""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from .data import ImageData, check_labels, iter_batches, load_images
from .errors import ConfigError, DatasetError
from .models.vision_model import VisionModel
from .progress import progress_enabled
from .runner import Runner
from .runtime import place_model

logger = logging.getLogger(__name__)

__all__ = ["evaluate_accuracy", "label_mapping", "check_eval_labels"]


def label_mapping(model_labels: list[str], data_labels: list[str] | None) -> torch.Tensor | None:
    """Index map dataset label -> model class when both name the same classes in another order."""
    if not data_labels or list(model_labels) == list(data_labels):
        return None
    lookup = {name.strip().lower(): i for i, name in enumerate(model_labels)}
    try:
        return torch.tensor([lookup[name.strip().lower()] for name in data_labels])
    except KeyError:
        logger.warning("dataset label names differ from the model's; comparing label indices as they are")
        return None


def _check_labels(batch, data: ImageData, num_classes: int, *, mapped: bool) -> None:
    """Refuse labels the model cannot predict: counted as wrong answers they would silently lower the accuracy."""
    bound = num_classes if not mapped else len(data.label_names or [])
    bad = (batch.labels < 0) | (batch.labels >= bound)
    if bool(bad.any()):
        where = int(bad.nonzero()[0, 0])
        label, row = int(batch.labels[where]), batch.indices[where]
        what = "has no label" if label == -1 else f"has label {label}"
        raise DatasetError(f"row {row} of {data.spec} {what}, but the model has {num_classes} classes (labels "
                           f"0-{num_classes - 1}): pass labelled images of the model's classes (or name the right "
                           "column with `label_column`)")


def check_eval_labels(model: VisionModel, data: ImageData) -> None:
    """Refuse, before any work, labels ``model`` cannot predict or that are not class indices (see
    :func:`hub_dfq.data.check_labels`): counted as wrong answers they would silently lower the accuracy."""
    remap = label_mapping(model.labels, data.label_names)
    bound = model.num_classes if remap is None else len(data.label_names or [])
    check_labels(data, bound, classes=model.num_classes)


@torch.inference_mode()
def evaluate_accuracy(
    model: VisionModel,
    data: ImageData | Any,
    *,
    batch_size: int = 128,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool | None = None,
    token: str | bool | None = None,
    device: str | torch.device | None = None,
    runner: Runner | None = None,
) -> dict[str, float | int]:
    """Top-1 and top-5 accuracy (in percent) of ``model`` on the labelled images of ``data``.

    Under ``accelerate launch`` every process evaluates its own whole batches of ``data``
    (:mod:`hub_dfq.partition`) and the counts are summed, so every process returns exactly the
    single-process numbers.

    Args:
        model: the classifier (its preprocessing is applied to the images).
        data: an :class:`ImageData` or anything :func:`load_images` accepts.
        batch_size: images per forward pass.
        forward: replaces ``model.module`` (e.g. a quantized model) while keeping the preprocessing.
        progress: show a progress bar (``None``: on a terminal).
        token: Hub token, when ``data`` is a Hub dataset id.
        device: where to run (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``); the model is moved there.
            ``None``: where the model is.
        runner: how the work is shared out over processes (default: :class:`~hub_dfq.runner.Runner` over the
            process group of the environment).

    Returns:
        ``{"top1": .., "top5": .., "n": .., "skipped": ..}``.

    Raises:
        DatasetError: the dataset has no label column, a label outside the model's classes, or no readable image.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"`batch_size` must be a positive integer, got {batch_size!r}")
    place_model(model, device)
    if not isinstance(data, ImageData):
        data = load_images(data, token=token)
    check_eval_labels(model, data)  # the whole label column, before the first image is decoded
    remap = label_mapping(model.labels, data.label_names)
    forward = forward or model.module
    device = model.device  # where forward computes (a quantized model lives with its float model)
    k = min(5, model.num_classes)
    runner = Runner() if runner is None else runner
    runner.check_same("evaluation", dataset=data.spec, split=data.split, rows=data.num_rows, batch_size=batch_size,
                      model=model.source.spec)
    part = runner.rows(data, block=batch_size)
    top1 = top5 = n = skipped = 0
    bar = tqdm(total=part.num_rows, desc="eval", unit="img", dynamic_ncols=True,
               disable=not progress_enabled(progress) or not runner.is_main)
    for batch in iter_batches(part, model.preprocess, batch_size=batch_size):
        skipped += len(batch.skipped)
        bar.update(len(batch.indices) + len(batch.skipped))
        if not batch.indices:
            continue
        _check_labels(batch, data, model.num_classes, mapped=remap is not None)
        labels = batch.labels if remap is None else remap[batch.labels]
        logits = forward(batch.pixel_values.to(device)).float().cpu()
        topk = logits.topk(k, dim=-1).indices
        top1 += (topk[:, 0] == labels).sum().item()
        top5 += (topk == labels[:, None]).any(dim=-1).sum().item()
        n += len(labels)
        bar.set_postfix(top1=f"{100.0 * top1 / n:.2f}")
    bar.close()
    if runner.enabled:
        totals = runner.sum([torch.tensor([top1, top5, n, skipped], dtype=torch.int64)])[0].tolist()
        top1, top5, n, skipped = (int(v) for v in totals)
    if n == 0:
        raise DatasetError(f"{data.spec}: no readable images to evaluate ({skipped} skipped)")
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "n": n, "skipped": skipped}
