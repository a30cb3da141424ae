"""`synthesize`: calibration images from nothing but the model, written as a Hub dataset folder."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import platform
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .. import __version__
from ..budget import shrink
from ..cache import cache_root, record_entry
from ..deprecation import renamed_arguments
from ..errors import ConfigError, OutputExistsError, OutputWriteError
from ..fingerprint import fingerprint, weights_sha256
from ..locks import hold
from ..models.loader import load_model
from ..models.vision_model import VisionModel
from ..outputs import declare, reserve_folder, staged
from ..progress import progress_bar, progress_enabled
from ..runner import Runner
from ..runtime import place_model, resolve_device, resolve_precision
from .card import write_card, write_preview
from .config import Regularizers, SynthConfig
from .dataset import SyntheticDataset, load_dataset_folder
from .generator import ALGORITHM_VERSION, BatchGenerator, check_model_supports
from .publish import push_dataset_folder
from .records import clear_records, merge_records, read_records, write_record
from .registry import BN_LOSSES
from .writer import (
    MANIFEST_FORMAT,
    features_for,
    finished_shards,
    planned_files,
    read_manifest,
    remove_stale_temporaries,
    resume_manifest,
    shard_name,
    unique_label_names,
    write_manifest,
    write_shard,
)

logger = logging.getLogger(__name__)

__all__ = ["synthesize", "synthesize_folder", "generate_folder", "shard_seed", "synth_cache_dir",
           "load_dataset_folder", "synth_fingerprint", "run_identity"]


def shard_seed(seed: int, index: int) -> int:
    """Seed of shard ``index``: a function of the run seed and the index only (any process can make any shard)."""
    return int.from_bytes(hashlib.sha256(f"hub-dfq/synth/{seed}/{index}".encode()).digest()[:8], "little") >> 1


def synth_cache_dir() -> Path:
    """Root of cached synthetic datasets (see :func:`hub_dfq.cache.cache_root`)."""
    return cache_root("synth")


def run_identity(model: VisionModel, config: SynthConfig, *, weights: str | None = None) -> dict[str, Any]:
    """Everything that decides the bytes of a run: arguments, weights, algorithm versions and where it ran.

    Stored in ``generation.json``; a run resumes only into a folder with the same identity.
    """
    return {
        "arguments": config.to_dict(),
        "weights_sha256": weights or weights_sha256(model.module),
        "algorithm": {"loop": ALGORITHM_VERSION, "method": config.method_info.version,
                      "loss": BN_LOSSES.get(config.loss).version},
        "device_type": model.device.type,
    }


def synth_fingerprint(identity: dict[str, Any]) -> str:
    """The cache key of a run (see :func:`hub_dfq.fingerprint.fingerprint`)."""
    return fingerprint("synth", version=identity["algorithm"]["loop"], **identity)


def _same_everywhere(identity: dict[str, Any], **more: Any) -> dict[str, Any]:
    """What every process of a launch must agree on, the run's arguments named as the API names them."""
    return {**identity["arguments"], **{k: v for k, v in identity.items() if k != "arguments"}, **more}


def _model_record(model: VisionModel, weights: str) -> dict[str, Any]:
    src = model.source
    return {"spec": src.spec, "repo_id": src.repo_id, "revision": src.revision, "commit": src.commit, "url": src.url,
            "library": src.library, "architecture": src.architecture, "license": src.license, "weights_sha256": weights}


def _weighted_layers(records: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    total = sum(rows for rows, _ in records)
    if not total or not records[0][1]:
        return {}
    return {name: sum(rows * values[name] for rows, values in records) / total for name in records[0][1]}


def _summary(layers: dict[str, float]) -> dict[str, Any] | None:
    return {"total": sum(layers.values()), "layers": layers} if layers else None


def generate_folder(model: VisionModel, config: SynthConfig, out_dir: str | os.PathLike[str], *, resume: bool = False,
                    overwrite: bool = False, progress: bool | None = None, repo_id: str | None = None,
                    stop_after_shards: int | None = None, on_shard: Callable[[int], None] | None = None,
                    owned: bool = False, runner: Runner | None = None) -> dict[str, Any]:
    """Generate (or finish) the dataset folder of one run; returns its manifest (``generation.json``).

    A new or empty folder is written in place, shard by shard, so an interrupted run can be continued
    (``resume``). Replacing an earlier dataset (``overwrite``) writes the new one beside it and swaps it
    in when it is complete: an interruption leaves the earlier dataset as it was. The folder is locked
    for the whole run.

    Under ``accelerate launch`` the shards still to do are dealt out over the processes (shard ``i``
    is the same bytes whichever process makes it, so the folder is the single-process folder); rank 0
    alone locks the folder and writes ``generation.json``, the preview and the card, and every process
    returns the manifest.

    Args:
        model: source model.
        config: run arguments.
        out_dir: output folder (a Hub dataset repository); with several processes, on a filesystem
            they all share.
        resume: continue a run with the same arguments from its finished shards.
        overwrite: replace a synthetic dataset hub-dfq wrote there (other files in the folder are kept).
        progress: show a progress bar (``None``: on a terminal).
        repo_id: Hub id the card's loading snippet names (when the folder will be pushed).
        stop_after_shards: generate at most this many new shards (per process) and return (for tests of resuming).
        on_shard: called with the index of each shard after it is written.
        owned: ``out_dir`` is a hub-dfq cache entry (ours by construction, marker or not).
        runner: how the work is shared out over processes (default: :class:`~hub_dfq.runner.Runner` over the
            process group of the environment).

    Raises:
        ConfigError: ``resume`` with ``overwrite``, or ``stop_after_shards`` with ``overwrite``.
        OutputExistsError, UnsafeOutputError, OutputWriteError, OutputLockedError: see
            :func:`hub_dfq.outputs.check_folder`; also a ``resume`` of a run with other arguments.
    """
    if resume and overwrite:
        raise ConfigError("`resume=True` and `overwrite=True` exclude each other: pick one")
    check_model_supports(model, config.method)
    runner = Runner() if runner is None else runner
    weights = weights_sha256(model.module)
    identity = run_identity(model, config, weights=weights)
    runner.check_same("synthesis", **_same_everywhere(identity, out_dir=os.fspath(out_dir), resume=resume,
                                                      overwrite=overwrite, repo_id=repo_id,
                                                      stop_after_shards=stop_after_shards))
    runner.check_shared_folder(out_dir, argument="out_dir")
    with contextlib.ExitStack() as held:  # rank 0's lock (and staging folder) for the whole run
        folder, replacing, previous = runner.hold_on_main(
            held, _reserved, out_dir, identity=identity, num_shards=config.num_shards, overwrite=overwrite,
            resume=resume, owned=owned, stop_after_shards=stop_after_shards)
        try:
            return _generate(model=model, config=config, folder=Path(folder), previous=previous, identity=identity,
                             weights=weights, progress=progress, repo_id=repo_id,
                             stop_after_shards=stop_after_shards, on_shard=on_shard, runner=runner)
        except OutputWriteError as err:
            if replacing:
                raise
            raise OutputWriteError(f"{err} (the finished shards are kept: continue with `resume=True`)") from err


@contextlib.contextmanager
def _reserved(out_dir: str | os.PathLike[str], *, identity: dict[str, Any], num_shards: int, overwrite: bool,
              resume: bool, owned: bool, stop_after_shards: int | None) -> Iterator[tuple[str, bool, dict | None]]:
    """Lock and check the folder (rank 0); yields where to write, whether it replaces a dataset, what to resume."""
    with reserve_folder(out_dir, kind="dataset", overwrite=overwrite, resume=resume, owned=owned) as out:
        if out.holds_result and overwrite:
            if stop_after_shards is not None:
                raise ConfigError("`stop_after_shards` cannot be combined with `overwrite=True` (a replacement "
                                  "is swapped in only when it is complete)")
            with staged(out) as staging:
                yield str(staging), True, None
            return
        previous = resume_manifest(out.path, identity) if out.holds_result else None
        declare(out.path, "dataset", planned_files(num_shards))
        remove_stale_temporaries(out.path)
        yield str(out.path), False, previous


def _generate(*, model: VisionModel, config: SynthConfig, folder: Path, previous: dict[str, Any] | None,
              identity: dict[str, Any], weights: str, progress: bool | None, repo_id: str | None,
              stop_after_shards: int | None, on_shard: Callable[[int], None] | None,
              runner: Runner) -> dict[str, Any]:
    total = config.num_shards
    run_key = synth_fingerprint(identity)
    manifest = runner.main_only(_start_manifest, model, config, folder, previous=previous, identity=identity,
                                weights=weights, processes=runner.world_size)
    done = {r["index"] for r in manifest["shards"]}
    mine = runner.shards([i for i in range(total) if i not in done])  # round robin: shards take about as long
    if runner.enabled:
        logger.info("rank %d of %d generates shards %s", runner.rank, runner.world_size,
                    mine or "none (nothing left)")
    # Rank 0's bar counts its own images; in one process that is the whole run, as before.
    if runner.enabled:
        bar = _progress(config, 0, progress, total=sum(len(config.shard_rows(i)) for i in mine)) \
            if runner.is_main else None
    else:
        bar = _progress(config, sum(len(config.shard_rows(i)) for i in done), progress)
    log = _ShardLog(folder, manifest, run_key, is_main=runner.is_main, read_others=runner.enabled,
                    on_shard=on_shard)
    try:
        made_by_rank = runner.every_rank(
            _make_shards, BatchGenerator(model, config) if mine else None, config, mine, folder=folder,
            features=features_for(model.labels), bar=bar, num_classes=model.num_classes,
            stop_after_shards=stop_after_shards, log=log)
    finally:
        if bar is not None:
            bar.close()
    return runner.main_only(_close_run, folder, manifest, made_by_rank, config=config, repo_id=repo_id)


def _start_manifest(model: VisionModel, config: SynthConfig, folder: Path, *, previous: dict[str, Any] | None,
                    identity: dict[str, Any], weights: str, processes: int) -> dict[str, Any]:
    """The manifest of the run before its new shards, written to ``folder`` (rank 0)."""
    if previous is None:
        clear_records(folder)  # records of a replaced run
    run_key = synth_fingerprint(identity)
    # shards recorded in the manifest, or (after a killed multi-process run) by the rank that made them
    records = merge_records((previous or {}).get("shards", []), read_records(folder, fingerprint=run_key))
    done = finished_shards(folder, {"shards": records})
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "hub_dfq_version": __version__,
        "torch_version": torch.__version__,
        "device": f"{model.device.type} ({platform.machine()}, {torch.get_num_threads()} threads)"
                  + (f" x {processes} processes" if processes > 1 else ""),
        "model": _model_record(model, weights),
        "arguments": config.to_dict(),
        "label_names": unique_label_names(model.labels),
        "input_size": list(model.input_size),
        "num_rows": config.num_images,
        "num_shards": config.num_shards,
        "fingerprint": run_key,
        "algorithm": identity["algorithm"],
        "device_type": identity["device_type"],
        "complete": False,
        "shards": [done[i] for i in sorted(done)],
    }
    if config.method_info.augment is not None:
        manifest["jitter"] = BatchGenerator.resolve_jitter(model, config)
    write_manifest(folder, manifest)  # first: a run killed before its first shard can still be resumed
    return manifest


class _ShardLog:
    """Records each shard as soon as it is written, so that a killed run can be resumed: rank 0 in
    ``generation.json`` (with the records the other ranks left so far), any other rank in its record file."""

    def __init__(self, folder: Path, manifest: dict[str, Any], run_key: str, *, is_main: bool, read_others: bool,
                 on_shard: Callable[[int], None] | None) -> None:
        self.folder, self.run_key, self.is_main, self.read_others = folder, run_key, is_main, read_others
        self.manifest = dict(manifest)  # rank 0's running copy; the run's manifest is merged at the end
        self.on_shard = on_shard

    def __call__(self, record: dict[str, Any]) -> None:
        if self.is_main:
            others = read_records(self.folder, fingerprint=self.run_key) if self.read_others else []
            self.manifest["shards"] = merge_records(self.manifest["shards"], [record], others)
            write_manifest(self.folder, self.manifest)
        else:
            write_record(self.folder, record, fingerprint=self.run_key)
        if self.on_shard is not None:
            self.on_shard(record["index"])


def _make_shards(generator: BatchGenerator | None, config: SynthConfig, indices: list[int], *, folder: Path,
                 features, bar, num_classes: int, stop_after_shards: int | None,
                 log: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    """Generate and write the shards ``indices`` (one process's share); their records, each also given to ``log``."""
    made: list[dict[str, Any]] = []
    for index in indices:
        if stop_after_shards is not None and len(made) >= stop_after_shards:
            break
        record = _generate_shard(generator, config, index, config.num_shards, folder, features, bar, num_classes)
        made.append(record)
        log(record)
    return made


def _close_run(folder: Path, manifest: dict[str, Any], made_by_rank: list[list[dict[str, Any]]], *,
               config: SynthConfig, repo_id: str | None) -> dict[str, Any]:
    """The manifest with every rank's new shards, written (rank 0); a complete run also gets its preview and card."""
    manifest = {**manifest, "shards": merge_records(manifest["shards"], *made_by_rank)}
    if len(manifest["shards"]) < config.num_shards:
        write_manifest(folder, manifest)
        return manifest
    _finish(manifest, config)
    write_manifest(folder, manifest)
    write_preview(folder, manifest)
    write_card(folder, manifest, repo_id=repo_id)
    clear_records(folder)  # all of them are in generation.json now
    return manifest


def _progress(config: SynthConfig, initial: int, enabled: bool | None, *, total: int | None = None):
    if not progress_enabled(enabled):
        return None
    return progress_bar(progress=True, total=config.num_images if total is None else total, initial=initial,
                        unit="img", desc=f"synth {config.method}")


def _generate_shard(generator: BatchGenerator, config: SynthConfig, index: int, total: int, folder: Path, features,
                    bar, num_classes: int) -> dict[str, Any]:
    rng = torch.Generator().manual_seed(shard_seed(config.seed, index))
    rows = config.shard_rows(index)
    started = time.perf_counter()
    pixels, labels, starts, ends, final_losses = [], [], [], [], []
    for first in range(rows.start, rows.stop, config.batch_size):
        batch_rows = range(first, min(first + config.batch_size, rows.stop))
        # Targets spread evenly over the classes by global row index, so every shard is balanced too.
        targets = torch.tensor([r % num_classes for r in batch_rows], dtype=torch.long)
        where = f" (rows {batch_rows.start}-{batch_rows.stop - 1}, shard {index})"
        on_step = None
        if bar is not None and config.iters:
            def on_step(step: int, loss: float, _bar=bar) -> None:
                if step % 10 == 0 or step == config.iters - 1:
                    _bar.set_postfix(step=f"{step + 1}/{config.iters}", loss=f"{loss:.4g}", refresh=False)
        result = generator.generate(targets, rng, on_step=on_step, where=where)
        pixels.append(result.pixels)
        labels.append(result.labels)
        starts.append((len(batch_rows), result.start))
        ends.append((len(batch_rows), result.end))
        if result.losses:
            final_losses.append(result.losses[-1])
        if bar is not None:
            end_total = sum(result.end.values()) if result.end else None
            postfix = {"div": f"{end_total:.4g}"} if end_total is not None else {}
            if result.losses:
                postfix["loss"] = f"{result.losses[-1]:.4g}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(len(batch_rows))
    all_pixels, all_labels = torch.cat(pixels), torch.cat(labels)
    name = shard_name(index, total)
    sha = write_shard(folder / name, all_pixels, all_labels, features)
    return {
        "index": index,
        "file": name,
        "rows": len(rows),
        "first_row": rows.start,
        "sha256": sha,
        "bytes": (folder / name).stat().st_size,
        "seed": shard_seed(config.seed, index),
        "seconds": time.perf_counter() - started,
        "label_counts": {str(k): v for k, v in sorted(Counter(all_labels.tolist()).items())},
        "final_loss": sum(final_losses) / len(final_losses) if final_losses else None,
        "bn_divergence": {"start": _weighted_layers(starts), "end": _weighted_layers(ends)},
    }


def _finish(manifest: dict[str, Any], config: SynthConfig) -> None:
    shards = manifest["shards"]
    manifest["complete"] = True
    manifest["wall_time_s"] = sum(r["seconds"] for r in shards)
    starts = [(r["rows"], r["bn_divergence"]["start"]) for r in shards]
    ends = [(r["rows"], r["bn_divergence"]["end"]) for r in shards]
    manifest["bn_divergence"] = {
        "metric": BN_LOSSES.get(config.loss).reported,
        "loss": config.loss,
        "definition": "per BN layer: channel-mean KL(N(running) || N(batch)) (kl) or ZeroQ's L2 distance (l2), "
                      "measured per batch and averaged over the batches weighted by rows; total = sum over layers; "
                      "the loss optimised may differ (rkl reports kl)",
        "start": _summary(_weighted_layers(starts)),
        "end": _summary(_weighted_layers(ends)),
    }
    counts: Counter[str] = Counter()
    for r in shards:
        counts.update({k: v for k, v in r["label_counts"].items()})
    names = manifest["label_names"]
    manifest["label_counts"] = {names[int(k)]: v for k, v in sorted(counts.items(), key=lambda kv: int(kv[0]))}


@renamed_arguments(n="num_images")
def synthesize(model: VisionModel | str, method: str = "bns", num_images: int = 256, *,
               progress: bool | None = None, **options: Any) -> SyntheticDataset:
    """Generate ``num_images`` calibration images from the model alone ("The Knowledge Within").

    The result is written as a Hub dataset folder (see :func:`synthesize_folder`, which takes the
    same arguments and documents them) and returned as a :class:`~hub_dfq.synth.dataset.SyntheticDataset`:
    a ``datasets.Dataset`` with columns ``image`` and ``label`` that also has ``save_pretrained`` and
    ``push_to_hub`` for that folder (card, preview, ``generation.json`` and shards).

    Example:
        >>> ds = hub_dfq.synthesize("default", "bns", num_images=64)  # doctest: +SKIP
        >>> ds.features["label"].names[:2]  # doctest: +SKIP
        ['airplane', 'automobile']
        >>> ds.save_pretrained("bns-64")  # or ds.push_to_hub("me/resnet20-bns-64")  # doctest: +SKIP
    """
    folder = synthesize_folder(model, method, num_images, progress=progress, **options)
    return SyntheticDataset._read(folder, progress=progress)


def _reusable(folder: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of a complete run with this identity whose shards are all intact, else ``None``."""
    existing = read_manifest(folder)
    if existing is None or not existing.get("complete") or existing.get("fingerprint") != synth_fingerprint(identity):
        return None
    if len(finished_shards(folder, existing)) != existing.get("num_shards"):
        return None
    return existing


@renamed_arguments(n="num_images", priors="regularizers")
def synthesize_folder(
    model: VisionModel | str,
    method: str = "bns",
    num_images: int = 256,
    *,
    iters: int | None = None,
    batch_size: int = 64,
    loss: str = "rkl",
    lr: float | None = None,
    seed: int = 0,
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    shard_size: int = 1024,
    precision: str = "auto",
    regularizers: Regularizers | dict[str, Any] | None = None,
    warmup: float = 0.05,
    progress: bool | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    token: str | bool | None = None,
    revision: str | None = None,
    device: str | torch.device | None = None,
    runner: Runner | None = None,
) -> Path:
    """Generate ``num_images`` calibration images from the model alone ("The Knowledge Within").

    The result is written as a Hub dataset folder (parquet shards under ``data/``, ``README.md``
    card, ``preview.png``, ``generation.json``). ``out_dir`` is checked and locked before the model
    is loaded (see :mod:`hub_dfq.outputs`): it must be new or empty, or hold a dataset hub-dfq wrote.
    Under ``accelerate launch`` the processes share the shards (the folder is byte-identical to a
    single-process run's) and rank 0 alone locks the folder, writes the card and pushes.

    Args:
        model: a :class:`VisionModel` or a model spec for :func:`hub_dfq.load_model`.
        method: a registered synthesis method: ``gaussian``, ``inception``, ``bns``, ``bns+i`` (see
            :mod:`hub_dfq.synth.registry`).
        num_images: number of images.
        iters: optimisation steps per batch (default: the method's, 200 for the BNS methods, shrunk for models
            that cost more than the CIFAR ResNets, see :mod:`hub_dfq.budget`; none for gaussian).
        batch_size: images optimised together (clamped to ``num_images``).
        loss: BN loss optimised: ``rkl`` (reverse KL, the default), ``kl`` (the paper's), ``l2`` (ZeroQ), or
            another registered one; the dataset reports the paper's KL for both KL losses.
        lr: peak Adam learning rate (default: the method's; 1.0 for bns/bns+i, 0.1 for inception).
        seed: run seed; shard ``i`` depends only on ``(seed, i)``.
        out_dir: output folder; ``None`` uses a cache folder keyed on the fingerprint of the run (weights,
            arguments, algorithm versions, precision and device type), so a repeated call loads
            instead of regenerating.
        resume: continue an interrupted run in ``out_dir`` (same arguments required).
        overwrite: replace the dataset hub-dfq wrote in ``out_dir`` (written beside it and swapped in when
            complete; files hub-dfq did not write there are kept).
        shard_size: rows per parquet shard.
        precision: ``auto``, ``fp32`` or ``bf16``.
        regularizers: :class:`~hub_dfq.synth.config.Regularizers` (or a dict of its fields) for inception and
            bns+i; ``priors`` is its old name.
        warmup: fraction of the iterations with a linearly rising learning rate (then a cosine decay).
        progress: show a progress bar (``None``: on a terminal).
        push_to_hub: also push the folder to this dataset repository (one commit).
        private: create the Hub repository as private.
        token: Hub token for loading the model and for the push.
        revision: Hub revision of the model, when ``model`` is a spec.
        device: where to run (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``); the model is moved there.
            ``None``: where the model is (the CPU for a spec). ``precision="auto"`` picks bf16 where it is
            natively fast on that device (a GPU with bf16, a CPU with AVX512-BF16/AMX).
        runner: how the work is shared out over processes (default: :class:`~hub_dfq.runner.Runner` over the
            process group of the environment).

    Returns:
        The finished folder (the cache folder when ``out_dir`` is ``None``).

    Raises:
        ConfigError: an unknown method or loss, or a non-positive ``num_images`` or ``iters``.
        UnsupportedModelError: a BN method on a model without BatchNorm layers.
        OutputExistsError: ``out_dir`` is a file, holds files hub-dfq did not write, or holds another run and
            neither ``resume`` nor ``overwrite`` is set.
        UnsafeOutputError: ``out_dir`` is the current folder, a parent of it, the home folder or a root.
        OutputWriteError: ``out_dir`` cannot be written (read-only, disk full).
        OutputLockedError: another hub-dfq process is writing ``out_dir`` (or the cache entry).
        DivergedError: the loss became NaN/Inf (nothing of the broken batch is saved).
        PublishError: the push failed (the local folder stays complete).

    Example:
        >>> folder = hub_dfq.synth.api.synthesize_folder("default", "bns", 512, out_dir="bns-r20")  # doctest: +SKIP
    """
    if out_dir is None and overwrite:
        raise ConfigError("`overwrite=True` needs an explicit `out_dir` (the cache is keyed on the run itself)")
    if isinstance(regularizers, dict):
        regularizers = Regularizers(**regularizers)
    run_device = resolve_device(device) if device is not None else (
        model.device if isinstance(model, VisionModel) else torch.device("cpu"))
    precision = resolve_precision(precision, run_device)
    config = SynthConfig(method=method, num_images=num_images, iters=iters, batch_size=batch_size, loss=loss, lr=lr,
                         seed=seed, shard_size=shard_size, precision=precision,
                         regularizers=regularizers or Regularizers(), warmup=warmup)
    runner = Runner() if runner is None else runner
    with contextlib.ExitStack() as held:
        if out_dir is not None:  # checked, and locked (by rank 0), before the model is even loaded
            runner.hold_on_main(held, _checked, out_dir, overwrite=overwrite, resume=resume)
        if not isinstance(model, VisionModel):
            model = load_model(model, revision=revision, token=token)
        place_model(model, run_device)
        check_model_supports(model, config.method)
        if iters is None and config.iters > 0:  # the method's default steps, sized by the model's cost
            config = dataclasses.replace(config, iters=shrink(config.iters, model.gflops(), floor=50))
        identity = run_identity(model, config)
        # before anything is written: processes given different arguments would write one folder of two runs
        runner.check_same("synthesis", **_same_everywhere(
            identity, out_dir=None if out_dir is None else os.fspath(out_dir), resume=resume, overwrite=overwrite,
            push_to_hub=push_to_hub, private=private))
        run = dict(progress=progress, repo_id=push_to_hub, runner=runner)
        if out_dir is None:
            folder = synth_cache_dir() / f"{config.method.replace('+', '-plus-')}-{synth_fingerprint(identity)[:20]}"
            runner.check_shared_folder(folder, what="the synthesis cache folder",
                                       hint=" (set HUB_DFQ_CACHE to one, or pass `out_dir`)")
            runner.hold_on_main(held, hold, folder, what="synthetic-data cache entry")
            _cached(model, config, identity, folder, **run)
        else:
            folder = Path(out_dir)
            runner.check_shared_folder(folder, argument="out_dir")
            existing = runner.main_only(_reusable, folder, identity) if resume else None
            if existing is None:
                generate_folder(model, config, folder, resume=resume, overwrite=overwrite, **run)
            elif push_to_hub:
                runner.main_only(write_card, folder, existing, repo_id=push_to_hub)
        if push_to_hub:  # rank 0 alone pushes: one commit
            runner.main_only(push_dataset_folder, folder, push_to_hub, private=private, token=token)
    return folder


@contextlib.contextmanager
def _checked(out_dir: str | os.PathLike[str], *, overwrite: bool, resume: bool) -> Iterator[None]:
    """``out_dir`` checked and locked (rank 0, until the run ends)."""
    with reserve_folder(out_dir, kind="dataset", overwrite=overwrite, resume=resume):
        yield


def _cached(model: VisionModel, config: SynthConfig, identity: dict[str, Any], folder: Path, *, runner: Runner,
            progress: bool | None, repo_id: str | None) -> None:
    """Reuse, finish or (if damaged) regenerate the cache entry ``folder`` (call with its lock held by rank 0)."""
    # first (also for an entry written before records existed): `hub-dfq cache clear` deletes only recorded ones
    runner.main_only(record_entry, "synth", folder)
    if runner.main_only(_reuse_entry, folder, identity, repo_id=repo_id):
        return
    generate_folder(model, config, folder, resume=True, owned=True, progress=progress, repo_id=repo_id,
                    runner=runner)


def _reuse_entry(folder: Path, identity: dict[str, Any], *, repo_id: str | None) -> bool:
    """Whether the cache entry ``folder`` is complete (its card then names ``repo_id``); a damaged one is removed."""
    existing = _reusable(folder, identity)
    if existing is not None:
        if repo_id:
            write_card(folder, existing, repo_id=repo_id)
        return True
    if folder.exists():
        try:
            resume_manifest(folder, identity)
        except OutputExistsError as err:  # a damaged entry of our own cache: made again, not a user's problem
            logger.warning("the cache entry %s is damaged (%s); generating it again", folder, err)
            shutil.rmtree(folder)
    return False
