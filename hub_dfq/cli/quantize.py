"""``hub-dfq quantize MODEL --weights W --activations A``: data-free quantization with an accuracy summary."""

from __future__ import annotations

import argparse
import ast
import shlex
import tempfile
import time
from pathlib import Path
from typing import Any

from ..backends.registry import BACKENDS
from ..deprecation import warn_deprecated
from ..errors import ConfigError, PublishError
from ..outputs import check_folder, reserve_folder
from ..quant.placement import strictest
from ..quant.registry import (
    ACT_OBSERVERS,
    DEFAULT_CALIBRATION,
    PRESETS,
    QUANT_ALGORITHMS,
    WEIGHT_GRIDS,
    WEIGHT_OBSERVERS,
)
from ..registry import resolve
from ..synth.registry import SYNTH_METHODS
from .launch import add_launch_option, is_main_process, place, relaunch, world_rank
from .numbers import MAX_IMAGES, SEED_MAX, count
from .options import (
    add_common_options,
    add_model_arguments,
    choices_help,
    model_kwargs,
    write_json,
)


def _bits_or_none(text: str) -> int | None:
    if text.lower() in ("none", "same", "off"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a bit width 2-8 or 'same', got {text!r}") from None


def _override(text: str) -> tuple[str, dict[str, int | str]]:
    """``PATTERN:weights=8,activations=8`` -> ``(PATTERN, {...})``."""
    pattern, sep, fields = text.partition(":")
    if not sep or not pattern or not fields:
        raise argparse.ArgumentTypeError(f"override must look like 'layer3.*:weights=8,activations=8', got {text!r}")
    change: dict[str, int | str] = {}
    for item in fields.split(","):
        key, eq, value = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"override field must be NAME=VALUE, got {item!r}")
        change[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    return pattern, change


def setting_value(text: str) -> Any:
    """A setting's value as Python reads it (``0.03``, ``(20, 2)``, ``None``), else the word itself (``nearest``)."""
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


def _setting(text: str) -> tuple[str, str, Any]:
    """``reconstruct.lr_bias=0.001`` -> ``("reconstruct", "lr_bias", 0.001)``."""
    name, eq, value = text.partition("=")
    algorithm, dot, key = name.strip().partition(".")
    if not eq or not dot or not algorithm or not key:
        raise argparse.ArgumentTypeError(f"setting must look like 'reconstruct.iters=500', got {text!r}")
    return algorithm, key, setting_value(value)


def _settings(items: list[tuple[str, str, Any]]) -> dict[str, dict[str, Any]]:
    settings: dict[str, dict[str, Any]] = {}
    for algorithm, key, value in items:
        settings.setdefault(algorithm, {})[key] = value
    return settings


def register(sub) -> None:
    parser = sub.add_parser(
        "quantize", help="quantize a model to W/A bits, calibrated on synthetic (default) or real images",
        description="Quantize a classifier (BN folded, per-channel weights, per-tensor activations, first/last "
        "layer 8-bit) and report full-precision vs quantized top-1. Without --calibration DATA, BN-statistics "
        "synthetic images (smoothed by image priors) are generated on the fly (cached).")
    add_model_arguments(parser)
    parser.add_argument("--weights", type=int, default=4, help="weight bits, 2-8 (default 4)")
    parser.add_argument("--activations", type=int, default=4, help="activation bits, 2-8 (default 4)")
    parser.add_argument("--calibration", default=DEFAULT_CALIBRATION,
                        help="a synthesis method (" + ", ".join(SYNTH_METHODS.names()) + ") or a dataset spec "
                        f"(default {DEFAULT_CALIBRATION}: BN statistics plus image priors)")
    parser.add_argument("--calibration-split", help="split of a calibration dataset")
    parser.add_argument("--calibration-images", "--calibration-size", dest="calibration_images", type=int,
                        help="calibration images (default: the preset's)")
    parser.add_argument("--algorithm", "--method", dest="algorithm", choices=["auto", *QUANT_ALGORITHMS.names()],
                        default="auto", help="quantization algorithm: 'auto' (default: calibrate at 8 bits, "
                        "gptq for weights below, reconstruct for activations below), " + choices_help(QUANT_ALGORITHMS))
    parser.add_argument("--preset", choices=PRESETS.names(), default="fast",
                        help="budget: " + choices_help(PRESETS, "fast"))
    parser.add_argument("--first-last-bits", type=_bits_or_none, default=8,
                        help="bits of the first conv and last linear, or 'same' (default 8)")
    parser.add_argument("--residual-bits", type=_bits_or_none, default=8,
                        help="bits of residual-addition operands, or 'same' as --activations (default 8)")
    parser.add_argument("--weight-observer", choices=WEIGHT_OBSERVERS.names(), default="mse",
                        help="weight ranges: " + choices_help(WEIGHT_OBSERVERS, "mse"))
    parser.add_argument("--act-observer", choices=ACT_OBSERVERS.names(), default="mse",
                        help="activation ranges: " + choices_help(ACT_OBSERVERS, "mse"))
    parser.add_argument("--weight-grid", choices=WEIGHT_GRIDS, default="asymmetric",
                        help="integer grid of weights below 8 bits: 'asymmetric' (default; all 2^bits levels over "
                             "each output channel's range, zero exact) or 'symmetric' (narrow range around zero)")
    parser.add_argument("--override", dest="overrides", action="append", type=_override, default=[],
                        metavar="GLOB:FIELD=V,...",
                        help="per-module scheme change, e.g. 'layer3.*:weights=8' (repeatable)")
    parser.add_argument("--setting", dest="settings", action="append", type=_setting, default=[],
                        metavar="ALGORITHM.NAME=VALUE",
                        help="change one setting of an algorithm over the preset's (repeatable), e.g. "
                        "reconstruct.iters=500 or gptq.damp=0.05; an unknown name lists the known ones")
    parser.add_argument("--size-budget", metavar="SIZE",
                        help="mixed precision: the most bytes the checkpoint may take (3000000, 2.9MB) or a ratio "
                        "of the float32 checkpoint (0.16x, 16%%); each layer gets 2, 4 or 8-bit weights by its "
                        "sensitivity measured on the calibration images (first/last layer and --override layers "
                        "stay as set)")
    parser.add_argument("--time-budget", metavar="DURATION",
                        help="how long the run may take on this device (900, 15m, 1h): the preset's image and "
                        "step counts shrink until the expected time fits (default: the preset's target, for models "
                        "larger than the CIFAR ResNets); the budget chosen and the time expected are printed first")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                        help="keep modules matching GLOB in full precision (repeatable)")
    parser.add_argument("--seed", type=count(0, SEED_MAX), default=0, help="seed of synthesis and fitting (default 0)")
    parser.add_argument("--eval", dest="eval_data", default="auto",
                        help="labelled images to compare FP and quantized top-1 on; default 'auto': the embedded "
                        "1,000 CIFAR-10 test images for a model with CIFAR-10's classes, otherwise none; 'none' skips")
    parser.add_argument("--eval-split", help="split of the evaluation dataset")
    parser.add_argument("--eval-limit", type=int, help="evaluate on the first N images only")
    parser.add_argument("--out", dest="out_dir", help="save the quantized model to this folder (a Hub model repo)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the checkpoint hub-dfq saved in --out (other files there are kept)")
    parser.add_argument("--backend", dest="backends", action="append", choices=BACKENDS.names(), default=[],
                        help="an integer inference backend (repeatable): quantize by its placement rules, add its "
                        "file to --out / the pushed repo and report its top-1 next to the PyTorch model's; "
                        + choices_help(BACKENDS))
    parser.add_argument("--onnx", action="store_true", help="deprecated spelling of --backend onnx")
    parser.add_argument("--push-to-hub", metavar="REPO", help="publish the quantized model to this Hub repo")
    parser.add_argument("--push-dataset", dest="dataset_repo", metavar="REPO",
                        help="also publish the synthetic calibration set to this Hub dataset repo (cards link both)")
    parser.add_argument("--private", action="store_true", help="create the Hub repositories as private")
    add_launch_option(parser)
    add_common_options(parser, json_help="write the summary as JSON to this file ('-' for stdout)")
    parser.set_defaults(func=run, parser=parser)


def _eval_spec(args: argparse.Namespace, model) -> str | None:
    """The evaluation data: the one asked for, or for 'auto' the embedded CIFAR-10 sample when it fits the model."""
    if args.eval_data.lower() == "none":
        return None
    if args.eval_data.lower() != "auto":
        return args.eval_data
    from ..data import (
        embedded_sample_labels,  # why: the parquet schema is read only for 'auto'
    )

    return "default" if list(model.labels) == embedded_sample_labels() else None


def _check_count(value: int | None, name: str, what: str) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"`{name}` must be a positive number of {what}, got {value}")
    if value is not None and value > MAX_IMAGES:  # 10^12 synthetic images were planned for ever: a hang
        raise ConfigError(f"`{name}` is {value:,}, more than hub-dfq handles ({MAX_IMAGES:,} {what})")


def run(args: argparse.Namespace) -> int:
    """Check every argument and output first, hold the lock of ``--out`` for the whole run (rank 0), then quantize."""
    _check_count(args.calibration_images, "calibration_images", "calibration images")
    _check_count(args.eval_limit, "eval_limit", "evaluation images")
    if args.out_dir:  # before minutes of work (every process of a launch checks the shared folder alike)
        check_folder(args.out_dir, kind="checkpoint", overwrite=args.overwrite)
    launched = relaunch(args)  # --num-processes: this process only waits for the ones it starts
    if launched is not None:
        return launched
    if not args.out_dir or world_rank()[0] > 1:  # under a launch, rank 0's save takes the lock when it writes
        return _run(args)
    with reserve_folder(args.out_dir, kind="checkpoint", overwrite=args.overwrite):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    # why: keeps `hub-dfq --help` (and a launching process) free of torch, timm and datasets
    from ..data import load_images
    from ..evaluation import check_eval_labels, evaluate_accuracy
    from ..models.loader import load_model
    from ..quant.api import quantize
    from ..quant.data import is_synthetic
    from ..runner import Runner

    if args.dataset_repo and not args.push_to_hub:
        raise ConfigError("`dataset_repo` needs `push_to_hub` (the dataset card links to the model)")
    if args.private and not args.push_to_hub:  # as synth and score: a flag that would do nothing is a mistake
        raise ConfigError("`private` only applies with `push_to_hub`")
    backends = _backends(args)
    if backends and not (args.out_dir or args.push_to_hub):
        raise ConfigError(f"`backend` adds {', '.join(b.file_name for b in backends)} to the saved or published "
                          "checkpoint: add `out_dir` or `push_to_hub` (or export a saved checkpoint later with "
                          "`hub-dfq export`)")
    if args.dataset_repo and not is_synthetic(args.calibration):
        raise ConfigError("`dataset_repo` publishes synthetic calibration data; with real data "
                          f"({args.calibration}) there is nothing to publish")
    start = time.perf_counter()
    model = place(load_model(args.model, **model_kwargs(args)))
    eval_spec = _eval_spec(args, model)
    eval_data = load_images(eval_spec, split=args.eval_split, limit=args.eval_limit, token=args.token) \
        if eval_spec else None  # opened now: a wrong spec fails before quantizing
    if eval_data is not None:
        check_eval_labels(model, eval_data)  # and so do labels the model cannot predict
    calibration = args.calibration
    if not is_synthetic(calibration):
        calibration = load_images(calibration, split=args.calibration_split, limit=args.calibration_images,
                                  token=args.token)
    settings = _settings(args.settings)
    qmodel = quantize(model, weights=args.weights, activations=args.activations, calibration=calibration,
                      calibration_images=args.calibration_images, algorithm=args.algorithm, preset=args.preset,
                      first_last_bits=args.first_last_bits, residual_bits=args.residual_bits,
                      weight_observer=args.weight_observer, act_observer=args.act_observer,
                      weight_grid=args.weight_grid, overrides=dict(args.overrides), exclude=args.exclude,
                      settings=settings, size_budget=args.size_budget,
                      time_budget=args.time_budget, seed=args.seed, progress=args.progress,
                      placement=strictest([b.placement for b in backends]) if backends else None)
    quant_seconds = time.perf_counter() - start
    summary = {
        "model": model.source.spec,
        "weights": args.weights,
        "activations": args.activations,
        "first_last_bits": args.first_last_bits,
        "residual_bits": args.residual_bits,
        "weight_grid": args.weight_grid,
        "calibration": args.calibration,
        "calibration_provenance": qmodel.calibration,
        "algorithm": qmodel.algorithm,
        "preset": args.preset,
        "settings": settings,
        "seed": args.seed,
        "backends": args.backends,
        "fingerprint": qmodel.history.get("fingerprint"),
        "seconds": round(quant_seconds, 2),
        "fp_top1": None,
        "quant_top1": None,
        "left_in_float": qmodel.left_in_float,
    }
    allocation = qmodel.history.get("allocation")
    if qmodel.history.get("budget"):
        summary["budget"] = qmodel.history["budget"]
    if allocation:
        summary["size_budget"] = {k: allocation[k] for k in ("budget", "bytes")}
        summary["layer_bits"] = allocation["bits"]
    evaluation = None
    if eval_data is not None:
        fp = evaluate_accuracy(model, eval_data, progress=args.progress)
        quant = evaluate_accuracy(model, eval_data, forward=qmodel, progress=args.progress)
        summary.update(fp_top1=fp["top1"], quant_top1=quant["top1"], eval=eval_data.spec, eval_n=quant["n"])
        evaluation = {"dataset": eval_data.spec, "split": eval_data.split, "n": quant["n"], "fp_top1": fp["top1"],
                      "fp_top5": fp["top5"], "quant_top1": quant["top1"], "quant_top5": quant["top5"]}
        for backend in backends:
            evaluation.update(_backend_accuracy(qmodel, eval_data, backend, progress=args.progress))
            summary[f"{backend.name}_top1"] = evaluation[f"{backend.name}_top1"]
    else:
        summary["eval_note"] = ("no evaluation: the model's classes are not CIFAR-10's; pass --eval DATA (labelled "
                                "images of its classes) to compare full-precision and quantized accuracy")
    if args.out_dir or args.push_to_hub:  # rank 0 alone saves and pushes; every rank learns whether it worked
        summary = Runner().main_only(lambda: _publish(args, qmodel, evaluation, summary) or summary)
    summary["total_seconds"] = round(time.perf_counter() - start, 2)
    if not is_main_process():
        return 0
    if args.json != "-":
        print(_render(summary, qmodel))
    write_json(args, summary)
    return 0


def _backends(args: argparse.Namespace) -> list:
    """The ``--backend`` descriptors (with the deprecated ``--onnx``), their packages checked before any work."""
    names = list(args.backends)
    if args.onnx:
        warn_deprecated("--onnx", "--backend onnx", stacklevel=1)
        names.append("onnx")
    backends = [BACKENDS.get(name) for name in dict.fromkeys(names)]
    for backend in backends:
        backend.require()
    args.backends = [b.name for b in backends]
    return backends


def _backend_accuracy(qmodel, data, backend, *, progress: bool) -> dict:
    """Top-1/top-5 of the exported integer model in the backend's engine (export is deterministic: the saved file
    is the same)."""
    with tempfile.TemporaryDirectory(prefix=f"hub-dfq-{backend.name}-") as tmp:
        engine = resolve(backend.load)(resolve(backend.export)(qmodel, Path(tmp) / backend.file_name))
        result = engine.evaluate(qmodel, data, progress=progress)
    return {f"{backend.name}_top1": result["top1"], f"{backend.name}_top5": result["top5"]}


def _publish(args: argparse.Namespace, qmodel, evaluation: dict | None, summary: dict) -> None:
    """Write the checkpoint folder, then push: the push writes the same model into a fresh folder and uploads it."""
    from ..hub.checkpoint import (  # why: huggingface_hub and safetensors load late
        push_to_hub,
        save_pretrained,
    )

    command = "hub-dfq " + shlex.join(getattr(args, "argv", None) or ["quantize", args.model])
    card_args = {"evaluation": evaluation, "command": command, "backends": args.backends}
    if args.out_dir:
        save_pretrained(qmodel, args.out_dir, repo_id=args.push_to_hub, calibration_repo=args.dataset_repo,
                        overwrite=args.overwrite, **card_args)
        summary["out"] = args.out_dir
    if args.push_to_hub:
        try:
            result = push_to_hub(qmodel, args.push_to_hub, private=args.private, token=args.token,
                                 calibration_folder=qmodel.calibration.get("folder"), dataset_repo=args.dataset_repo,
                                 **card_args)
        except PublishError as err:
            if not args.out_dir:
                raise
            raise PublishError(f"{err}; the checkpoint is saved in {args.out_dir}") from err
        summary["pushed"] = result.url
        if args.dataset_repo:
            summary["pushed_dataset"] = args.dataset_repo


def _render(summary: dict, qmodel) -> str:
    fl = summary["first_last_bits"]
    grid = f", {summary['weight_grid']} weight grid" if summary["weights"] < 8 else ""
    lines = [
        f"{summary['model']}: W{summary['weights']}A{summary['activations']} "
        f"(first/last layer {'%d-bit' % fl if fl else 'same'}{grid}), {summary['algorithm']} ({summary['preset']}), "
        f"calibrated on {summary['calibration']} ({qmodel.calibration.get('n', '?')} images)",
    ]
    if summary["fp_top1"] is not None:
        drop = summary["fp_top1"] - summary["quant_top1"]
        lines.append(f"top-1 on {summary['eval']} ({summary['eval_n']} images): full precision "
                     f"{summary['fp_top1']:.2f}%  quantized {summary['quant_top1']:.2f}%  ({-drop:+.2f} points)"
                     + "".join(f"  {BACKENDS.get(name).runtime} int8 {summary[name + '_top1']:.2f}%"
                               for name in summary.get("backends", []) if summary.get(name + "_top1") is not None))
    if summary.get("size_budget"):
        bits = list(summary["layer_bits"].values())
        lines.append(f"size budget {summary['size_budget']['budget']:,} bytes: checkpoint tensors "
                     f"{summary['size_budget']['bytes']:,} bytes; "
                     + ", ".join(f"{bits.count(b)} layers at {b}-bit" for b in sorted(set(bits))))
    if summary.get("eval_note"):
        lines.append(summary["eval_note"])
    expected = (summary.get("budget") or {}).get("expected_seconds")
    planned = f" (expected about {expected:.0f} s)" if expected else ""
    lines.append(f"time: {summary['seconds']:.1f} s to quantize{planned}, {summary['total_seconds']:.1f} s in all")
    if summary["left_in_float"]:
        lines.append("left in full precision: " + "; ".join(summary["left_in_float"]))
    if summary.get("out"):
        lines.append(f"saved to {summary['out']}")
    if summary.get("pushed"):
        lines.append(f"published to {summary['pushed']}"
                     + (f" with calibration set {summary['pushed_dataset']}" if summary.get("pushed_dataset") else ""))
    return "\n".join(lines)


__all__ = ["register", "run"]
