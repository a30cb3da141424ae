"""``hub-dfq quantize MODEL --weights W --activations A``: data-free quantization with an accuracy summary."""

from __future__ import annotations

import argparse
import shlex
import time

from ..errors import ConfigError

from .options import add_model_arguments, load_model_from_args, write_json

SYNTHETIC = ("bns", "bns+i", "inception", "gaussian")


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


def register(sub) -> None:
    parser = sub.add_parser(
        "quantize", help="quantize a model to W/A bits, calibrated on synthetic (default) or real images",
        description="Quantize a classifier (BN folded, per-channel weights, per-tensor activations, first/last "
        "layer 8-bit) and report full-precision vs quantized top-1. Without --calibration DATA, BN-statistics "
        "synthetic images are generated on the fly (cached).")
    add_model_arguments(parser)
    parser.add_argument("--weights", type=int, default=4, help="weight bits, 2-8 (default 4)")
    parser.add_argument("--activations", type=int, default=4, help="activation bits, 2-8 (default 4)")
    parser.add_argument("--calibration", default="bns",
                        help="synthetic method (bns, bns+i, inception, gaussian) or a dataset spec (default bns)")
    parser.add_argument("--calibration-split", help="split of a calibration dataset")
    parser.add_argument("--calibration-size", type=int, help="calibration images (default: the preset's)")
    parser.add_argument("--method", default="calibrate", help="calibrate, reconstruct or distill (default calibrate)")
    parser.add_argument("--preset", default="fast", help="fast or best (default fast)")
    parser.add_argument("--first-last-bits", type=_bits_or_none, default=8,
                        help="bits of the first conv and last linear, or 'same' (default 8)")
    parser.add_argument("--residual-bits", type=_bits_or_none, default=8,
                        help="bits of residual-addition operands, or 'same' as --activations (default 8)")
    parser.add_argument("--weight-observer", default="mse", help="minmax or mse (default mse)")
    parser.add_argument("--act-observer", default="mse", help="minmax, percentile or mse (default mse)")
    parser.add_argument("--override", action="append", type=_override, default=[], metavar="GLOB:FIELD=V,...",
                        help="per-module scheme change, e.g. 'layer3.*:weights=8' (repeatable)")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                        help="keep modules matching GLOB in full precision (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="seed of synthesis and fitting (default 0)")
    parser.add_argument("--eval", dest="eval_data", default="default",
                        help="labelled images to compare FP and quantized top-1 on (default: the embedded 1,000 "
                        "CIFAR-10 test images); 'none' skips")
    parser.add_argument("--eval-split", help="split of the evaluation dataset")
    parser.add_argument("--eval-limit", type=int, help="evaluate on the first N images only")
    parser.add_argument("--json", help="write the summary to this file ('-' for stdout)")
    parser.add_argument("--out", help="save the quantized model to this folder (a Hub model repo)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--onnx", action="store_true",
                        help="also write model.onnx (integer kernels in ONNX Runtime) to --out / the pushed repo, "
                        "and report its top-1 next to the PyTorch model's")
    parser.add_argument("--push-to-hub", metavar="REPO", help="publish the quantized model to this Hub repo")
    parser.add_argument("--push-dataset", metavar="REPO",
                        help="also publish the synthetic calibration set to this Hub dataset repo (cards link both)")
    parser.add_argument("--private", action="store_true", help="create the Hub repositories as private")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data import load_images
    from ..evaluation import evaluate_accuracy
    from ..quant import quantize

    if args.push_dataset and not args.push_to_hub:
        raise ConfigError("--push-dataset needs --push-to-hub REPO (the dataset card links to the model)")
    if args.onnx and not (args.out or args.push_to_hub):
        raise ConfigError("--onnx adds model.onnx to the saved or published checkpoint: add --out DIR or --push-to-hub "
                          "REPO (or export a saved checkpoint later with `hub-dfq export`)")
    if args.push_dataset and args.calibration.lower() not in SYNTHETIC:
        raise ConfigError("--push-dataset publishes synthetic calibration data; with real data "
                          f"({args.calibration}) there is nothing to publish")
    start = time.perf_counter()
    model = load_model_from_args(args)
    calibration = args.calibration
    if calibration.lower() not in SYNTHETIC:
        calibration = load_images(calibration, split=args.calibration_split, limit=args.calibration_size)
    qmodel = quantize(model, weights=args.weights, activations=args.activations, calibration=calibration,
                      calibration_size=args.calibration_size, method=args.method, preset=args.preset,
                      first_last_bits=args.first_last_bits, residual_bits=args.residual_bits,
                      weight_observer=args.weight_observer, act_observer=args.act_observer,
                      overrides=dict(args.override), exclude=args.exclude, seed=args.seed, progress=args.progress)
    quant_seconds = time.perf_counter() - start
    summary = {
        "model": model.source.spec,
        "weights": args.weights,
        "activations": args.activations,
        "first_last_bits": args.first_last_bits,
        "residual_bits": args.residual_bits,
        "calibration": args.calibration,
        "calibration_provenance": qmodel.calibration,
        "method": args.method,
        "preset": args.preset,
        "seed": args.seed,
        "seconds": round(quant_seconds, 2),
        "fp_top1": None,
        "quant_top1": None,
        "left_in_float": qmodel.report.unsupported + qmodel.report.excluded,
    }
    if args.eval_data and args.eval_data.lower() != "none":
        data = load_images(args.eval_data, split=args.eval_split, limit=args.eval_limit)
        fp = evaluate_accuracy(model, data, progress=args.progress)
        quant = evaluate_accuracy(model, data, forward=qmodel, progress=args.progress)
        summary.update(fp_top1=fp["top1"], quant_top1=quant["top1"], eval=data.spec, eval_n=quant["n"])
        evaluation = {"dataset": data.spec, "split": data.split, "n": quant["n"], "fp_top1": fp["top1"],
                      "fp_top5": fp["top5"], "quant_top1": quant["top1"], "quant_top5": quant["top5"]}
        if args.onnx:
            evaluation.update(_onnx_accuracy(qmodel, data, progress=args.progress))
            summary["onnx_top1"] = evaluation["onnx_top1"]
    else:
        evaluation = None
    if args.out or args.push_to_hub:
        _publish(args, qmodel, evaluation, summary)
    summary["total_seconds"] = round(time.perf_counter() - start, 2)
    print(_render(summary, qmodel))
    write_json(args.json, summary)
    return 0


def _onnx_accuracy(qmodel, data, *, progress: bool) -> dict:
    """Top-1/top-5 of the exported integer graph in ONNX Runtime (export is deterministic: the saved file is the same)."""
    import tempfile
    from pathlib import Path

    from ..export import export_onnx, load_onnx

    with tempfile.TemporaryDirectory(prefix="hub-dfq-onnx-") as tmp:
        session = load_onnx(export_onnx(qmodel, Path(tmp) / "model.onnx"))
        result = session.evaluate(qmodel, data, progress=progress)
    return {"onnx_top1": result["top1"], "onnx_top5": result["top5"]}


def _publish(args: argparse.Namespace, qmodel, evaluation: dict | None, summary: dict) -> None:
    """Write the checkpoint folder first, then push it: a failed push keeps the complete folder."""
    from ..export import push_to_hub, save_pretrained

    command = "hub-dfq " + shlex.join(getattr(args, "argv", None) or ["quantize", args.model])
    card_args = {"evaluation": evaluation, "command": command, "onnx": args.onnx}
    if args.out:
        save_pretrained(qmodel, args.out, repo_id=args.push_to_hub, calibration_repo=args.push_dataset,
                        overwrite=args.overwrite, **card_args)
        summary["out"] = args.out
    if args.push_to_hub:
        result = push_to_hub(qmodel, args.push_to_hub, private=args.private, folder=args.out,
                             calibration_folder=qmodel.calibration.get("folder"), dataset_repo=args.push_dataset,
                             **card_args)
        summary["pushed"] = result.url
        if args.push_dataset:
            summary["pushed_dataset"] = args.push_dataset


def _render(summary: dict, qmodel) -> str:
    fl = summary["first_last_bits"]
    lines = [
        f"{summary['model']}: W{summary['weights']}A{summary['activations']} "
        f"(first/last layer {'%d-bit' % fl if fl else 'same'}), {summary['method']} ({summary['preset']}), "
        f"calibrated on {summary['calibration']} ({qmodel.calibration.get('n', '?')} images)",
    ]
    if summary["fp_top1"] is not None:
        drop = summary["fp_top1"] - summary["quant_top1"]
        lines.append(f"top-1 on {summary['eval']} ({summary['eval_n']} images): full precision "
                     f"{summary['fp_top1']:.2f}%  quantized {summary['quant_top1']:.2f}%  ({-drop:+.2f} points)"
                     + (f"  ONNX Runtime int8 {summary['onnx_top1']:.2f}%" if summary.get("onnx_top1") is not None else ""))
    lines.append(f"time: {summary['seconds']:.1f} s to quantize, {summary['total_seconds']:.1f} s in all")
    if summary["left_in_float"]:
        lines.append("left in full precision: " + "; ".join(summary["left_in_float"]))
    if summary.get("out"):
        lines.append(f"saved to {summary['out']}")
    if summary.get("pushed"):
        lines.append(f"published to {summary['pushed']}"
                     + (f" with calibration set {summary['pushed_dataset']}" if summary.get("pushed_dataset") else ""))
    return "\n".join(lines)


__all__ = ["register", "run"]
