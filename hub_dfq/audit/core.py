"""``audit``: how close candidate datasets are to what a model's BN layers remember."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Any, Iterable, Iterator, Mapping, Sequence

import datasets
import torch
from tqdm.auto import tqdm

from ..bnstats import bn_layers_with_stats, running_moments
from ..data import ImageData, iter_batches, load_images
from ..errors import ArgumentTypeError, DatasetError, HubDfqError, UnsupportedModelError
from ..fingerprint import weights_sha256
from ..locks import hold
from ..models.checks import check_bn_statistics
from ..models.loader import load_model
from ..models.vision_model import VisionModel
from ..outputs import reserve_folder
from ..partition import block_size
from ..progress import progress_enabled
from ..runner import Runner
from ..runtime import place_model
from . import references as refs
from .config import AuditConfig
from .moments import IMAGE_METRIC, MomentAccumulator
from .registry import DIVERGENCES
from .results import AuditReport, CandidateResult
from .scores import SPAN_DECADES, aggregate, bootstrap_estimate, layer_divergences, similarity

logger = logging.getLogger(__name__)

__all__ = ["audit", "AuditConfig", "AuditReport", "CandidateResult", "MAX_LISTED_SKIPPED"]

# A broken dataset could skip millions of rows; the report lists the first ones and counts all.
MAX_LISTED_SKIPPED = 1000
# The per-image view of a candidate: these quantiles of its images' scores and its most atypical rows.
IMAGE_QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
MOST_ATYPICAL = 10
AGGREGATE = "geometric mean over BN layers of the channel-mean divergence"  # as the report states it

DataLike = Any  # str | PathLike | datasets.Dataset | IterableDataset | DatasetDict | ImageData


# ---- measuring ---------------------------------------------------------------------------------

def _check_model(model: VisionModel) -> list:
    layers = bn_layers_with_stats(model.bn_layers)
    if not layers:
        raise UnsupportedModelError(
            f"{model.source.spec} has no BatchNorm layers with running statistics: audits compare data with the "
            "BN statistics a model learnt in training, so they need a model with BatchNorm (e.g. a ResNet, "
            "MobileNet or EfficientNet; not a ViT or a LayerNorm ConvNeXt)")
    check_bn_statistics(model.module, spec=model.source.spec)  # a model built in Python was never checked at load
    return layers


def _accumulate(model: VisionModel, layers, batches: Iterable[torch.Tensor | tuple[torch.Tensor, list[int]]], *,
                score_batch: int, metric: str, bootstrap: int, seed: int, per_image: bool = False,
                image_metric: str | None = None) -> MomentAccumulator:
    """Forward every batch (a tensor, or ``(tensor, dataset row of each image)``) and accumulate its moments
    (``per_image``: every image's own scores too, with ``image_metric``)."""
    acc = MomentAccumulator(layers, device=model.device, score_batch=score_batch, metric=metric,
                            bootstrap=bootstrap, seed=seed, per_image=per_image, image_metric=image_metric)
    with torch.inference_mode(), acc:
        for item in batches:
            x, rows = item if isinstance(item, tuple) else (item, None)
            if x.shape[0] == 0:
                continue
            model.module(x.to(model.device, non_blocking=True))
            acc.step(rows)
    acc.finish()
    return acc


def _summarise(name: str, acc: MomentAccumulator, running, *, metric: str, skipped: list, n_skipped: int,
               split: str | None = None) -> CandidateResult:
    names = [n for n, _ in acc.layers]
    if acc.n_images == 0:
        return CandidateResult(name, 0, n_skipped, None, {m: None for m in DIVERGENCES.names()}, None, {}, {}, [],
                               skipped[:MAX_LISTED_SKIPPED], split=split, divergence_plugin=None)
    moments = acc.moments()
    per_metric = {m: layer_divergences(moments, running, m) for m in DIVERGENCES.names()}
    detail = {n: {m: per_metric[m][i] for m in per_metric} for i, n in enumerate(names)}
    plugin = aggregate(per_metric[metric])
    # the bias-corrected estimate and its interval (the plug-in value is kept beside them)
    boot = bootstrap_estimate(acc.bootstrap_moments(), running, metric, plugin_layers=per_metric[metric])
    divergence, ci = (boot.estimate, boot.ci) if boot else (plugin, None)
    return CandidateResult(
        dataset=name, n_images=acc.n_images, n_skipped=n_skipped, divergence=divergence, divergence_plugin=plugin,
        divergences={m: aggregate(v) for m, v in per_metric.items()}, ci=ci,
        layers=dict(zip(names, per_metric[metric])), layers_detail=detail, batch_scores=acc.batch_scores(),
        skipped=skipped[:MAX_LISTED_SKIPPED], split=split, image_scores=_image_view(acc))


def _image_view(acc: MomentAccumulator) -> dict[str, Any] | None:
    """Quantiles of the candidate's per-image scores and its most atypical rows (``None`` without them)."""
    if not acc.per_image:
        return None
    rows, scores = acc.image_scores()
    if not rows:
        return None
    q = torch.quantile(scores, torch.tensor(IMAGE_QUANTILES, dtype=torch.float64)).tolist()
    top = torch.argsort(scores, descending=True, stable=True)[:MOST_ATYPICAL].tolist()
    return {"metric": IMAGE_METRIC, "n": len(rows), "quantiles": {f"p{round(p * 100):02d}": v
                                                                  for p, v in zip(IMAGE_QUANTILES, q)},
            "most_atypical": [{"index": rows[i], "score": float(scores[i])} for i in top]}


def _image_batches(model: VisionModel, data: ImageData, *, batch_size: int, skipped: list, counter: list[int],
                   progress: bool, show: bool = True) -> Iterator[tuple[torch.Tensor, list[int]]]:
    bar = tqdm(total=data.num_rows, desc=f"audit {data.spec}"[:40], unit="img", dynamic_ncols=True, leave=False,
               disable=not progress_enabled(progress) or not show)
    try:
        for batch in iter_batches(data, model.preprocess, batch_size=batch_size):
            counter[0] += len(batch.skipped)
            for index, error in batch.skipped:
                if len(skipped) < MAX_LISTED_SKIPPED:
                    skipped.append({"index": index, "error": error})
            bar.update(len(batch.indices) + len(batch.skipped))
            if batch.indices:
                yield batch.pixel_values, batch.indices
    finally:
        bar.close()


def stream_data(model: VisionModel, layers, data: ImageData, *, name: str | None, what: str, batch_size: int,
                score_batch: int, metric: str, bootstrap: int, seed: int, image_metric: str | None,
                progress: bool | None,
                runner: Runner | None = None) -> tuple[MomentAccumulator, list[dict[str, Any]], int]:
    """Stream ``data`` (this process's whole score batches of it) into an accumulator that keeps per-image scores.

    Returns the accumulator merged over the processes of ``runner`` (default: the environment's), the unreadable
    rows (first ones, every process's) and their count.

    Raises:
        DatasetError: the dataset has no rows at all, or none of its images can be read.
    """
    runner = Runner() if runner is None else runner
    skipped: list = []
    counter = [0]
    part = runner.rows(data, block=block_size(batch_size, score_batch))
    batches = _image_batches(model, part, batch_size=batch_size, skipped=skipped, counter=counter, progress=progress,
                             show=runner.is_main)
    acc = _accumulate(model, layers, batches, score_batch=score_batch, metric=metric, bootstrap=bootstrap, seed=seed,
                      per_image=True, image_metric=image_metric)
    acc.merge(runner.group)
    if runner.enabled:
        everyone = runner.gather((counter[0], skipped))
        counter[0] = sum(n for n, _ in everyone)
        skipped = sorted((s for _, part_skipped in everyone for s in part_skipped), key=lambda s: s["index"])
    if acc.n_images == 0 and counter[0] == 0:
        raise DatasetError(f"{name or data.spec} is empty: there are no images to {what}")
    if acc.n_images == 0:  # as evaluation does: a dataset of unreadable files is an error, not a score
        first = f" (row {skipped[0]['index']}: {skipped[0]['error']})" if skipped else ""
        raise DatasetError(f"{name or data.spec}: none of its {counter[0]} images could be read{first}; check the "
                           "files, or leave this dataset out")
    return acc, skipped, counter[0]


def measure_data(model: VisionModel, data: ImageData, *, name: str | None = None, batch_size: int = 64,
                 score_batch: int = 64, metric: str = "kl", bootstrap: int = 200, seed: int = 0,
                 progress: bool = False, runner: Runner | None = None) -> CandidateResult:
    """Stream ``data`` through ``model`` and score its BN-input moments (no reference points).

    In a multi-process run (see :mod:`hub_dfq.distributed`) every process reads whole score batches
    of ``data`` (:mod:`hub_dfq.partition`) and the float64 sums are combined, so every process
    returns the single-process result (to float64 rounding).

    Raises:
        UnsupportedModelError: the model has no BN layer with running statistics.
        DatasetError: the dataset has no rows at all, or none of its images can be read.
    """
    layers = _check_model(model)
    acc, skipped, n_skipped = stream_data(model, layers, data, name=name, what="audit", batch_size=batch_size,
                                          score_batch=score_batch, metric=metric, bootstrap=bootstrap, seed=seed,
                                          image_metric=IMAGE_METRIC, progress=progress, runner=runner)
    return _summarise(name or data.spec, acc, running_moments(layers), metric=metric, skipped=skipped,
                      n_skipped=n_skipped, split=data.split)


def measure_tensors(model: VisionModel, batches: Iterable[torch.Tensor], *, name: str, score_batch: int = 64,
                    metric: str = "kl", bootstrap: int = 200, seed: int = 0) -> CandidateResult:
    """Score already-normalised input batches in this process alone (used for the reference points)."""
    layers = _check_model(model)
    acc = _accumulate(model, layers, batches, score_batch=score_batch, metric=metric, bootstrap=bootstrap, seed=seed)
    return _summarise(name, acc, running_moments(layers), metric=metric, skipped=[], n_skipped=0)


# ---- references --------------------------------------------------------------------------------

def _reference(model: VisionModel, layers, kind: str, *, n: int, steps: int, batch_size: int, score_batch: int,
               metric: str, bootstrap: int, seed: int, cache: bool, progress: bool = False) -> dict[str, Any] | None:
    """Measure (or read from the cache) one reference point.

    If the near point's synthesis fails, the entry says so (``failed``, ``error``) and carries no
    divergence: the audit goes on with the far point alone, and the report states why. A cache entry
    is locked while it is measured: a concurrent audit of the same model is told which process has it.
    """
    method = "gaussian" if kind == "far" else "hub_dfq.synth bns"
    settings = {"kind": kind, "method": method, "n": n, "steps": None if kind == "far" else steps,
                "score_batch": score_batch, "metric": metric, "bootstrap": bootstrap, "seed": seed}
    key = refs.reference_key(model, settings)
    if not cache:
        return {**_measure_reference(model, kind, method, settings, batch_size=batch_size, progress=progress),
                "cached": False}
    with hold(refs.entry_path(key), what="audit reference cache entry"):
        if (hit := refs.load_cached(key)) is not None:
            logger.info("audit reference %s read from the cache (%s)", kind, key)
            return {**hit, "cached": True}
        entry = _measure_reference(model, kind, method, settings, batch_size=batch_size, progress=progress)
        if not entry.get("failed"):
            refs.store_cached(key, entry)
    return {**entry, "cached": False}


def _measure_reference(model: VisionModel, kind: str, method: str, settings: dict[str, Any], *, batch_size: int,
                       progress: bool) -> dict[str, Any]:
    logger.info("measuring the %s reference (%s, %d images)", kind, method, settings["n"])
    common = {k: settings[k] for k in ("score_batch", "metric", "bootstrap", "seed")}
    n, seed = settings["n"], settings["seed"]
    if kind == "far":
        result = measure_tensors(model, refs.gaussian_batches(model.input_size, n=n, batch_size=batch_size,
                                                              seed=seed), name="gaussian noise", **common)
    else:
        try:
            synthetic = refs.synth_near_dataset(model, n=n, seed=seed, steps=settings["steps"], progress=progress)
        except (HubDfqError, RuntimeError, MemoryError, OSError) as err:
            # a reference must not sink the audit (bad settings, divergence, out of memory, disk): go on without
            # it, and say so in the log and the report
            logger.warning("the near reference could not be synthesised (%s: %s); similarity uses the one-point "
                           "normalisation against noise", type(err).__name__, err)
            return {"method": method, "settings": settings, "failed": True,
                    "error": f"{type(err).__name__}: {err}", "divergence": None}
        data = synthetic if isinstance(synthetic, ImageData) else load_images(synthetic)
        result = measure_data(model, data, name="bns synthetic", batch_size=batch_size, **common)
    return {"method": method, "settings": settings, **result.to_dict()}


# ---- the public verb ---------------------------------------------------------------------------

def _candidates(data: DataLike | Sequence[DataLike] | Mapping[str, DataLike]) -> list[tuple[str | None, Any]]:
    single = (str, os.PathLike, ImageData, datasets.Dataset, datasets.IterableDataset, datasets.DatasetDict,
              datasets.IterableDatasetDict)
    if isinstance(data, Mapping) and not isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return [(str(k), v) for k, v in data.items()]
    if isinstance(data, single):
        return [(None, data)]
    return [(None, d) for d in data]


def _open(name: str | None, spec: Any, load_kwargs: dict[str, Any]) -> tuple[str, ImageData]:
    if isinstance(spec, ImageData):
        data = spec
        if load_kwargs.get("limit") is not None:
            data = load_images(spec.dataset, limit=load_kwargs["limit"], image_column=spec.image_column,
                               label_column=spec.label_column)
            data.spec, data.split = spec.spec, spec.split
    else:
        data = load_images(spec, **load_kwargs)
    if name is None:
        name = os.fspath(spec) if isinstance(spec, (str, os.PathLike)) else data.spec
    return name, data


def _config(config: AuditConfig | Mapping[str, Any] | None, settings: dict[str, Any]) -> AuditConfig:
    """``config`` (an :class:`AuditConfig`, its dict, or the defaults) with the keyword ``settings`` over it."""
    # the former spelling is handled here, not by hub_dfq.deprecation.renamed_arguments: its new name is a field
    # of AuditConfig inside **settings, not a parameter the decorator can bind
    if "reference_steps" in settings:
        if "reference_iters" in settings:
            raise ArgumentTypeError("audit() got both `reference_steps` (deprecated) and `reference_iters`: pass only "
                                    "`reference_iters`")
        warnings.warn("`reference_steps` is deprecated: use `reference_iters`", FutureWarning, stacklevel=3)
        settings["reference_iters"] = settings.pop("reference_steps")
    if isinstance(config, Mapping):
        config = AuditConfig.from_dict(config)
    elif config is None:
        config = AuditConfig()
    elif not isinstance(config, AuditConfig):
        raise ArgumentTypeError(f"config must be an AuditConfig (or its dict), got {type(config).__name__}")
    return config.replace(**settings) if settings else config


def audit(
    model: VisionModel | str,
    data: DataLike | Sequence[DataLike] | Mapping[str, DataLike],
    config: AuditConfig | Mapping[str, Any] | None = None,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    device: str | torch.device | None = None,
    runner: Runner | None = None,
    **settings: Any,
) -> AuditReport:
    """Score how close each candidate dataset is to the data the model was trained on.

    Every image goes through the model's eval preprocessing and forward pass; at the input of every
    BatchNorm layer the per-channel count, sum and sum of squares are accumulated in float64
    (streaming: a dataset is never held in memory) and compared with the layer's running
    statistics. Labels are never needed.

    Under ``accelerate launch`` every process reads its own whole score batches of each candidate,
    the float64 sums are all-reduced and every process returns the single-process report (to float64
    rounding); rank 0 alone measures the reference points and writes ``out_dir``.

    Args:
        model: a :class:`VisionModel` or a spec for :func:`hub_dfq.load_model`.
        data: one dataset (anything :func:`hub_dfq.load_images` takes, or an ``ImageData``), a list
            of them, or a mapping ``name -> dataset`` (names label the report).
        config: an :class:`~hub_dfq.AuditConfig` (or its dict); keyword settings below override its fields.
        out_dir: also write ``audit.json``, ``audit.md`` and ``audit_layers.png`` as this folder (new or
            empty, or one hub-dfq wrote; checked before any work, see :mod:`hub_dfq.outputs`).
        overwrite: replace an audit report hub-dfq wrote in ``out_dir`` earlier.
        progress: show progress bars (``None``: on a terminal).
        token: Hub token for the model and the datasets.
        revision: Hub revision of the model, when ``model`` is a spec.
        device: where to run (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``); the model is moved there.
            ``None``: where the model is. Moments are accumulated in float64 on that device.
        runner: how the work is shared out over processes (default: :class:`~hub_dfq.runner.Runner` over the
            process group of the environment).
        **settings: fields of :class:`~hub_dfq.AuditConfig`, where each is described (``limit``, ``metric``,
            ``references``, ``bootstrap``, ...); ``reference_steps`` is the deprecated spelling of ``reference_iters``.

    Returns:
        An :class:`AuditReport`; ``report.ranking()`` lists candidates from closest to farthest.

    Raises:
        UnsupportedModelError: the model has no BatchNorm layer with running statistics.
        DatasetError: a candidate cannot be opened, is empty, or has no readable image.
        ConfigError: a setting is out of range.
        TypeError: a keyword that is no setting.
        OutputExistsError, OutputWriteError, UnsafeOutputError, OutputLockedError: ``out_dir`` cannot be
            written (see :func:`hub_dfq.outputs.check_folder`).

    Example:
        >>> report = hub_dfq.audit("default", ["default", "parquet:my_photos.parquet"], limit=500)
        >>> [(c.dataset, round(c.similarity, 2)) for c in report.ranking()]
        >>> hub_dfq.audit("default", "default", AuditConfig(references="gaussian", bootstrap=0))
    """
    config = _config(config, settings)
    runner = Runner() if runner is None else runner
    if out_dir is not None and runner.is_main:  # checked, and locked, before any work: a refused folder costs nothing
        reservation = reserve_folder(out_dir, kind="audit", overwrite=overwrite)
    else:  # no report, or another rank's: rank 0 alone writes it
        reservation = contextlib.nullcontext()
    with reservation:
        if not isinstance(model, VisionModel):
            model = load_model(model, token=token, revision=revision)
        place_model(model, device)
        layers = _check_model(model)

        # Open every candidate first: a wrong spec fails in seconds, not after the first audits.
        load_kwargs = {"split": config.split, "limit": config.limit, "image_column": config.image_column,
                       "streaming": config.streaming, "token": token}
        opened = [_open(name, spec, load_kwargs) for name, spec in _candidates(data)]
        if not opened:
            raise DatasetError("no dataset to audit: pass at least one")
        seen: dict[str, int] = {}
        for i, (name, d) in enumerate(opened):  # unique names, so the report's keys are unambiguous
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 1:
                opened[i] = (f"{name} #{seen[name]}", d)

        if runner.enabled:  # before any work: processes that audit different things would combine nonsense
            runner.check_same("audit", weights=weights_sha256(model.module), datasets=[n for n, _ in opened],
                              rows=[d.num_rows for _, d in opened], **config.to_dict(), out_dir=out_dir)
        common = dict(score_batch=config.score_batch, metric=config.metric, bootstrap=config.bootstrap,
                      seed=config.seed)
        references, budget = config.references, config.reference_budget_gmacs
        images, iters = config.reference_images, config.reference_iters
        reference_info: dict[str, Any] = {"far": None, "near": None}
        if isinstance(references, Mapping):
            reference_info = {k: ({"divergence": float(references[k]), "method": "given"}
                                  if references.get(k) is not None else None) for k in ("far", "near")}
        elif references != "none":
            kinds = ("far", "near") if references == "auto" else ("far",)
            if "near" in kinds and budget is not None:
                cost = refs.near_cost_gmacs(model, n=images, iters=iters)
                if cost > budget:
                    # too expensive to synthesise here, and a cut-down synthesis is no anchor: say so, use noise alone
                    kinds = ("far",)
                    reason = (f"BNS synthesis of {images} images x {iters} steps would cost ~{cost:,.0f} GMACs, "
                              f"over the budget of {budget:,.0f} (reference_budget_gmacs)")
                    logger.info("near reference %s", reason)
                    reference_info["near"] = {"method": "hub_dfq.synth bns", "skipped": True, "error": reason,
                                              "divergence": None, "cost_gmacs": cost}

            def measure_references() -> dict[str, Any]:
                return {kind: _reference(model, layers, kind, n=images, steps=iters, batch_size=config.batch_size,
                                         cache=config.cache, progress=progress, **common)
                        for kind in kinds}

            # Rank 0 alone measures the reference points (or reads them from its cache); every rank gets them.
            reference_info.update(runner.main_only(measure_references))
        far = (reference_info["far"] or {}).get("divergence")
        near = (reference_info["near"] or {}).get("divergence")
        near_failed = (reference_info["near"] or {}).get("error")
        if far is not None and near is not None and 0 < near < far:
            normalisation = "two-point: similarity = log(far / d) / log(far / near)"
        elif far is not None:
            why = "was skipped" if (reference_info["near"] or {}).get("skipped") else "failed"
            normalisation = f"one-point: similarity = log10(far / d) / {SPAN_DECADES:g}" + (
                f" (the near reference {why}: {near_failed})" if near_failed else "")
        else:
            normalisation = None

        results = []
        for name, d in opened:
            result = measure_data(model, d, name=name, batch_size=config.batch_size, progress=progress, runner=runner,
                                  **common)
            results.append(result)
        for r in results + [reference_info[k] for k in ("far", "near") if isinstance(reference_info[k], dict)]:
            _attach_similarity(r, far=far, near=near)
        scored = sorted((r for r in results if r.divergence is not None), key=lambda r: r.divergence)
        for rank, r in enumerate(scored, 1):
            r.rank = rank

        report = AuditReport(
            model={**model.source.__dict__, "url": model.source.url, "bn_layers": [n for n, _ in layers],
                   "input_size": list(model.input_size)},
            settings={**config.reported(normalisation=normalisation), "aggregate": AGGREGATE},
            references=reference_info,
            candidates=results,
        )
        if out_dir is not None:  # rank 0 writes; every rank returns the same report
            runner.main_only(report.save, out_dir, overwrite=overwrite)
        return report


def _attach_similarity(result: CandidateResult | dict, *, far: float | None, near: float | None) -> None:
    get = (lambda k: result.get(k)) if isinstance(result, dict) else (lambda k: getattr(result, k))
    div, ci = get("divergence"), get("ci")
    sim = similarity(div, far=far, near=near) if div is not None else None
    sim_ci = None
    if ci and sim is not None:
        lo, hi = similarity(ci[1], far=far, near=near), similarity(ci[0], far=far, near=near)
        sim_ci = (lo, hi) if lo is not None and hi is not None else None
    if isinstance(result, dict):
        result["similarity"], result["similarity_ci"] = sim, list(sim_ci) if sim_ci else None
    else:
        result.similarity, result.similarity_ci = sim, sim_ci
