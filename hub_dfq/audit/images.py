"""``score_images``: one BN score per image, a threshold calibrated without real data, and filtering.

An image's score is how far its own activations sit from what the model's BN layers remember: at
every BN input the image's per-channel spatial mean and variance are compared with the layer's
running statistics as Gaussians (``metric``, by default ``reverse_kl`` = ``KL(N(image) || N(running))``),
averaged over channels, then the geometric mean is taken over layers (as the dataset-level audit
aggregates). Higher = less like the training data. It is computed from the same hooks and sums as
:func:`hub_dfq.audit.audit` (:class:`~hub_dfq.audit.moments.MomentAccumulator` with ``per_image=True``),
in the same forward pass.

Thresholds need no real data: the model's own BNS synthetic images (:func:`hub_dfq.synthesize`) are
scored and the ``1 - fpr`` quantile of their scores becomes the threshold; ``fpr`` is then the share
of in-distribution images the threshold is meant to flag.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch

from ..budget import shrink
from ..data import ImageData, load_images
from ..errors import ConfigError, DatasetError
from ..models.loader import load_model
from ..models.vision_model import VisionModel
from ..outputs import reserve_folder
from ..runner import Runner
from ..runtime import place_model
from . import references as refs
from .core import MAX_LISTED_SKIPPED, _accumulate, _check_model, _image_batches, stream_data
from .image_folder import ImageScores, push_scored_folder
from .moments import IMAGE_METRIC
from .registry import DIVERGENCES

logger = logging.getLogger(__name__)

__all__ = ["ImageScores", "score_images", "calibrate_threshold", "DEFAULT_METRIC", "CALIBRATIONS"]

DEFAULT_METRIC = IMAGE_METRIC
CALIBRATIONS = ("bns", "none")


def _select(scores: np.ndarray, *, keep_fraction: float | None, max_score: float | None,
            threshold: dict[str, Any] | None) -> dict[str, Any] | None:
    """The filter as a maximum score: ``keep_fraction`` keeps the ``ceil(f N)`` lowest scores."""
    if keep_fraction is not None:
        k = max(1, math.ceil(keep_fraction * len(scores) - 1e-9))
        bound = float(np.sort(scores)[k - 1]) if len(scores) else math.inf
        rule, value = "keep_fraction", keep_fraction
    elif max_score is not None:
        bound, rule, value = float(max_score), "max_score", max_score
    elif threshold is not None:
        bound, rule, value = float(threshold["value"]), "fpr", threshold["fpr"]
    else:
        return None
    kept = int((scores <= bound).sum())
    return {"rule": rule, "value": value, "max_score": bound, "kept": kept, "rejected": len(scores) - kept}


def _score_tensors(model: VisionModel, layers, batches, *, metric: str) -> np.ndarray:
    acc = _accumulate(model, layers, batches, score_batch=64, metric=metric, bootstrap=0, seed=0, per_image=True)
    return acc.image_scores()[1].numpy()


def calibrate_threshold(model: VisionModel, fpr: float, *, calibration: Any = "bns", metric: str = DEFAULT_METRIC,
                        images: int | None = None, iters: int | None = None, seed: int = 0,
                        batch_size: int = 64, progress: bool | None = None) -> dict[str, Any]:
    """A score threshold meant to flag about ``fpr`` of in-distribution images.

    ``calibration="bns"`` needs no real data: ``images`` BNS synthetic images (:func:`hub_dfq.synthesize`,
    ``iters`` steps, cached by it) are scored; by default 64 images x 200 steps, both divided by the model's
    cost over the CIFAR ResNets' (:func:`hub_dfq.budget.shrink`: 20 x 64 on EfficientNet-Lite0 at 224 px,
    minutes on a CPU). Any other value is a dataset of trusted in-distribution images (anything
    :func:`hub_dfq.load_images` takes; its first ``images`` rows, all by default). The threshold is the
    ``1 - fpr`` quantile (linear interpolation) of the calibration scores.

    BNS images are optimised towards the running statistics, so each one scores lower than a typical
    real image: on the CIFAR-10 ResNet-20 the threshold of ``fpr=0.05`` flagged about half of the real
    test images (``scripts/bench_ood.py``). A trusted real sample holds the rate (a conformal quantile).

    Raises:
        ConfigError: ``fpr`` outside (0, 1) or ``images`` < 2.
    """
    if not 0.0 < fpr < 1.0:
        raise ConfigError(f"`fpr` must be in (0, 1), got {fpr!r}")
    if images is not None and images < 2:
        raise ConfigError(f"`calibration_images` must be at least 2, got {images}")
    layers = _check_model(model)
    start = time.perf_counter()
    if isinstance(calibration, str) and calibration == "bns":
        gflops = model.gflops()
        images = shrink(64, gflops, floor=16) if images is None else images
        iters = shrink(200, gflops, floor=50) if iters is None else iters
        logger.info("calibrating the threshold on %d BNS synthetic images x %d steps", images, iters)
        synthetic = refs.synth_near_dataset(model, n=images, seed=seed, steps=iters, progress=progress)
        data = synthetic if isinstance(synthetic, ImageData) else load_images(synthetic)
        facts: dict[str, Any] = {"calibration": "bns", "iters": iters, "seed": seed}
    else:
        data = calibration if isinstance(calibration, ImageData) else load_images(calibration, limit=images)
        facts = {"calibration": data.spec}
    part = _image_batches(model, data, batch_size=batch_size, skipped=[], counter=[0], progress=False)
    scores = _score_tensors(model, layers, part, metric=metric)
    if len(scores) < 2:
        raise DatasetError(f"the calibration set {facts['calibration']} has fewer than 2 readable images")
    value = float(np.quantile(scores, 1.0 - fpr))
    return {"value": value, "fpr": fpr, **facts, "images": int(len(scores)),
            "calibration_scores": {"min": float(scores.min()), "median": float(np.median(scores)),
                                   "max": float(scores.max())},
            "wall_time_s": time.perf_counter() - start}


def score_images(
    model: VisionModel | str,
    data: Any,
    *,
    metric: str = DEFAULT_METRIC,
    batch_size: int = 64,
    limit: int | None = None,
    split: str | None = None,
    image_column: str | None = None,
    streaming: bool = False,
    fpr: float | None = None,
    calibration: Any = "bns",
    calibration_images: int | None = None,
    calibration_iters: int | None = None,
    keep_fraction: float | None = None,
    max_score: float | None = None,
    seed: int = 0,
    out_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    shard_size: int = 1000,
    push_to_hub: str | None = None,
    private: bool = False,
    progress: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    device: str | torch.device | None = None,
    runner: Runner | None = None,
) -> ImageScores:
    """Score every image of a dataset against what the model's BN layers remember (see the module docstring).

    Args:
        model: a :class:`VisionModel` or a spec for :func:`hub_dfq.load_model`.
        data: anything :func:`hub_dfq.load_images` takes, or an ``ImageData``.
        metric: per-channel divergence (a name of ``hub-dfq list``'s audit divergences).
        batch_size: images per forward pass.
        limit: score only the first ``limit`` rows.
        split, image_column, streaming: as in :func:`hub_dfq.load_images`.
        fpr: calibrate a threshold that flags this share of in-distribution images (needs no real data).
        calibration: ``"bns"`` (the model's BNS synthetic images: no real data, but see
            :func:`calibrate_threshold` for how far its rate is off), ``"none"`` (no threshold), or a dataset of
            trusted in-distribution images.
        calibration_images, calibration_iters: size (and BNS steps) of the calibration set (``None``: see
            :func:`calibrate_threshold`).
        keep_fraction: keep the lowest-scoring ``ceil(f N)`` images, ``f`` in (0, 1].
        max_score: keep images scoring at most this. Without ``keep_fraction`` and ``max_score``, a
            calibrated ``fpr`` threshold is the filter.
        seed: seed of the calibration images.
        out_dir: write the scored dataset as a Hub dataset folder (new or empty, or one hub-dfq wrote): split
            ``train`` holds the kept rows with ``index``, ``bn_score`` and ``bn_layer_scores`` columns,
            ``rejected`` the filtered-out ones; ``README.md``, ``scores.json`` and plots beside them.
        overwrite: replace a scored dataset hub-dfq wrote in ``out_dir``.
        shard_size: rows per parquet shard.
        push_to_hub: also upload the folder to this Hub dataset repo (a temporary folder without ``out_dir``).
        private: create that repo as private.
        progress: show progress bars (``None``: on a terminal).
        token, revision: Hub token (model, data, push) and model revision.
        device: where to run (``None``: where the model is).
        runner: how the work is shared out over processes (default: :class:`~hub_dfq.runner.Runner` over the
            process group of the environment); rank 0 alone calibrates the threshold, writes and pushes.

    Returns:
        An :class:`ImageScores`.

    Raises:
        UnsupportedModelError: the model has no BatchNorm layer with running statistics.
        DatasetError: the dataset is empty or none of its images can be read.
        ConfigError: ``keep_fraction`` outside (0, 1], ``fpr`` outside (0, 1), conflicting filters.
        OutputExistsError, OutputWriteError, UnsafeOutputError, OutputLockedError: ``out_dir`` cannot be written.
        PublishError: the push failed (the local folder is complete).

    Example:
        >>> scores = hub_dfq.score_images("default", "default", keep_fraction=0.9, out_dir="scored")
        >>> scores.summary()["quantiles"]["median"]
    """
    if keep_fraction is not None and not (isinstance(keep_fraction, (int, float)) and 0.0 < keep_fraction <= 1.0):
        raise ConfigError(f"`keep_fraction` must be in (0, 1] (the share of images to keep), got {keep_fraction!r}")
    if max_score is not None and not (isinstance(max_score, (int, float)) and math.isfinite(max_score)):
        # why: every comparison with NaN is false, so `max_score=nan` kept no image and said nothing
        raise ConfigError(f"`max_score` must be a finite number, got {max_score!r}")
    if keep_fraction is not None and max_score is not None:
        raise ConfigError("pass either `keep_fraction` or `max_score`, not both")
    if fpr is not None and not 0.0 < fpr < 1.0:
        raise ConfigError(f"`fpr` must be in (0, 1) (the share of in-distribution images to flag), got {fpr!r}")
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (batch_size, shard_size)) \
            or batch_size < 1 or shard_size < 1:  # why: a string failed with a bare TypeError at the comparison
        raise ConfigError(f"`batch_size` and `shard_size` must be positive, got {batch_size}, {shard_size}")
    DIVERGENCES.get(metric)
    if private and not push_to_hub:
        raise ConfigError("`private` only applies with `push_to_hub`")

    runner = Runner() if runner is None else runner
    temporary = tempfile.TemporaryDirectory(prefix="hub-dfq-score-") if push_to_hub and out_dir is None else None
    target = out_dir if out_dir is not None else (os.path.join(temporary.name, "scored") if temporary else None)
    try:
        with (reserve_folder(target, kind="scores", overwrite=overwrite) if target is not None and runner.is_main
              else contextlib.nullcontext()):
            if not isinstance(model, VisionModel):
                model = load_model(model, token=token, revision=revision)
            place_model(model, device)
            layers = _check_model(model)
            if isinstance(data, ImageData):
                images = data
            else:
                images = load_images(data, split=split, limit=limit, image_column=image_column, streaming=streaming,
                                     token=token)
            start = time.perf_counter()
            acc, skipped, n_skipped = stream_data(model, layers, images, name=None, what="score", batch_size=batch_size,
                                                  score_batch=64, metric=metric, bootstrap=0, seed=0,
                                                  image_metric=None, progress=progress, runner=runner)
            wall = time.perf_counter() - start
            rows, layer_scores = acc.image_layer_scores()
            scores = acc.image_scores()[1].numpy()
            threshold = None
            if fpr is not None and not (isinstance(calibration, str) and calibration == "none"):
                threshold = runner.main_only(calibrate_threshold, model, fpr, calibration=calibration, metric=metric,
                                             images=calibration_images, iters=calibration_iters, seed=seed,
                                             batch_size=batch_size, progress=progress)
                threshold["flagged"] = int((scores > threshold["value"]).sum())
            result = ImageScores(
                model={**model.source.__dict__, "url": model.source.url, "bn_layers": [n for n, _ in layers],
                       "input_size": list(model.input_size)},
                dataset=images.spec, split=images.split, metric=metric, indices=rows, scores=scores,
                layer_scores=layer_scores.numpy().astype(np.float32), n_skipped=n_skipped,
                skipped=skipped[:MAX_LISTED_SKIPPED], threshold=threshold,
                selection=_select(scores, keep_fraction=keep_fraction, max_score=max_score, threshold=threshold),
                timing={"wall_time_s": wall, "images_per_s": (len(rows) + n_skipped) / max(wall, 1e-9)}, data=images)
            if target is not None and runner.is_main:
                result.save_pretrained(target, overwrite=overwrite, shard_size=shard_size, repo_id=push_to_hub)
        if push_to_hub and runner.is_main:
            result.timing["pushed_to"] = push_scored_folder(target, push_to_hub, private=private, token=token)
        return result
    finally:
        if temporary is not None:
            temporary.cleanup()
