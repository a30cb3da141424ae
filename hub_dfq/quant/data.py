"""Calibration data: any image dataset through the model's preprocessing, or synthetic images.

Synthetic data comes from :func:`hub_dfq.synth.synthesize` (BN-statistics synthesis and its
baselines), which caches its output so repeated runs do not regenerate it. Everything ends up as
one normalised tensor ``(N, C, H, W)`` plus a provenance record for cards and JSON reports.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..data import ImageData, iter_batches, load_images
from ..errors import ConfigError, DatasetError
from ..models.vision_model import VisionModel
from ..synth.api import load_dataset_folder, synthesize_folder
from ..synth.registry import SYNTH_METHODS
from ..synth.writer import read_manifest

logger = logging.getLogger(__name__)

__all__ = ["calibration_tensor", "images_to_tensor", "is_synthetic"]


def is_synthetic(calibration: Any) -> bool:
    """Whether ``calibration`` names a registered synthesis method (rather than a dataset)."""
    return isinstance(calibration, str) and calibration.lower() in SYNTH_METHODS


def images_to_tensor(model: VisionModel, data: ImageData, *, limit: int | None = None,
                     batch_size: int = 128) -> torch.Tensor:
    """Preprocess up to ``limit`` images of ``data`` into one ``(N, C, H, W)`` tensor.

    Raises:
        DatasetError: no readable image.
    """
    chunks, count, skipped = [], 0, 0
    for batch in iter_batches(data, model.preprocess, batch_size=batch_size):
        skipped += len(batch.skipped)
        if batch.indices:
            chunks.append(batch.pixel_values)
            count += len(batch.indices)
        if limit is not None and count >= limit:
            break
    if not chunks:
        raise DatasetError(f"calibration set {data.spec} has no readable images ({skipped} unreadable)")
    if skipped:
        logger.warning("calibration set %s: %d unreadable images skipped", data.spec, skipped)
    tensor = torch.cat(chunks)
    return tensor[:limit] if limit is not None else tensor


def _synthesize(model: VisionModel, method: str, n: int, *, seed: int, options: dict[str, Any]):
    if not SYNTH_METHODS.get(method).optimised:  # noise has no optimisation steps
        options = {k: v for k, v in options.items() if k not in ("iters", "lr")}
    # A cached Hub dataset folder: repeated runs reuse it, and a pushed calibration set is exactly it.
    folder = synthesize_folder(model, method, n, seed=seed, **options)
    data = load_images(load_dataset_folder(folder, progress=options.get("progress")))
    manifest = read_manifest(folder) or {}
    provenance = {"method": method, "n": n, "seed": seed, "folder": str(folder),
                  "fingerprint": manifest.get("fingerprint"),
                  **{k: v for k, v in options.items() if k != "progress"}}
    return images_to_tensor(model, data, limit=n), provenance


def calibration_tensor(model: VisionModel, calibration: Any, *, size: int | None, seed: int = 0,
                       synth_options: dict[str, Any] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Resolve ``calibration`` into normalised inputs and a provenance record.

    Args:
        model: the float model (its preprocessing is applied).
        calibration: a registered synthesis method (``"gaussian"``, ``"inception"``, ``"bns"``,
            ``"bns+i"``, ...), a dataset spec :func:`hub_dfq.load_images` understands, an
            :class:`ImageData`, a ``datasets.Dataset``, or a tensor of normalised inputs.
        size: number of images (``None``: all of a dataset; required for synthetic methods).
        seed: seed of synthetic generation.
        synth_options: extra keyword arguments of :func:`hub_dfq.synth.synthesize`.

    Returns:
        ``(inputs, provenance)``.

    Raises:
        ConfigError: a synthetic method without a size, or an unusable value.
        DatasetError: an empty dataset or one without readable images.
    """
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise ConfigError(f"`calibration_images` must be a positive integer, got {size!r}")
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 4 or tuple(calibration.shape[1:]) != tuple(model.input_size):
            raise ConfigError(f"calibration tensor must be (N, {', '.join(map(str, model.input_size))}), "
                              f"got {tuple(calibration.shape)}")
        if len(calibration) == 0:
            raise DatasetError("calibration tensor is empty")
        data = calibration[:size] if size else calibration
        return data.float(), {"kind": "tensor", "n": len(data)}
    if is_synthetic(calibration):
        method = calibration.lower()
        tensor, provenance = _synthesize(model, method, size or 256, seed=seed, options=dict(synth_options or {}))
        return tensor, {"kind": "synthetic", **provenance}
    data = calibration if isinstance(calibration, ImageData) else load_images(calibration, limit=size)
    if data.num_rows == 0:
        raise DatasetError(f"calibration set {data.spec} is empty")
    tensor = images_to_tensor(model, data, limit=size)
    return tensor, {"kind": "dataset", "spec": data.spec, "split": data.split, "n": len(tensor)}
