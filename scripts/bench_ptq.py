#!/usr/bin/env python
"""Post-training quantization accuracy: real vs synthetic calibration data, three methods.

For the shared CIFAR-10 ResNet-20 / ResNet-44: bit configurations x calibration data {real (1,024
train images), gaussian, inception, bns, bns+i} x method {calibrate, reconstruct, distill}; top-1 on
the shared test split next to FP top-1, plus wall time. Prints a markdown table and writes JSON;
finished cells are skipped on a re-run (resume), so the grid can be run in pieces:

    python scripts/bench_ptq.py --models resnet20 --configs W4A4 --calibration bns real --methods reconstruct
    python scripts/bench_ptq.py                       # the whole grid (hours on 2 cores)
    python scripts/bench_ptq.py --table-only          # re-print the table from the JSON

Synthetic sets are generated once per model and method through hub_dfq.synth (cached in
$HUB_DFQ_CACHE) and their generation time is reported separately.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODELS = {"resnet20": SHARED / "models" / "cifar10-resnet20", "resnet44": SHARED / "models" / "cifar10-resnet44"}
TEST = SHARED / "data" / "cifar10" / "test.parquet"
TRAIN = SHARED / "data" / "cifar10" / "train.parquet"
# name -> (weights, activations, first/last bits)
CONFIGS = {"W8A8": (8, 8, 8), "W4A8": (4, 8, 8), "W4A4": (4, 4, 8), "W3A3": (3, 3, 8), "W4A4-fl4": (4, 4, None)}
CALIBRATIONS = ("real", "gaussian", "inception", "bns", "bns+i")
METHODS = ("calibrate", "reconstruct", "distill")
TARGETS = {"W8A8": 0.1, "W4A8": 0.3, "W4A4": 1.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--calibration", nargs="+", default=list(CALIBRATIONS), choices=list(CALIBRATIONS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--preset", default="best", choices=("fast", "best"))
    p.add_argument("--calibration-size", type=int, default=1024)
    p.add_argument("--eval-limit", type=int, help="evaluate on the first N test images (default: all 10,000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--json", default=str(ROOT / "scripts" / "results" / "bench_ptq.json"))
    p.add_argument("--table-only", action="store_true", help="print the table from the JSON and exit")
    return p.parse_args(argv)


def cell_key(args, model: str, config: str, calibration: str, method: str) -> str:
    return (f"{model}|{config}|{calibration}|{args.calibration_size}|{method}|{args.preset}|"
            f"{args.eval_limit or 'full'}")


def load_results(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"fp": {}, "data": {}, "cells": {}}


def save_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def calibration_data(model, name: str, args, preset) -> tuple[torch.Tensor, dict]:
    from hub_dfq.quant.data import calibration_tensor

    start = time.perf_counter()
    if name == "real":
        data, prov = calibration_tensor(model, str(TRAIN), size=args.calibration_size)
    else:
        data, prov = calibration_tensor(model, name, size=args.calibration_size, seed=args.seed,
                                        synth_options={**preset.synth, "progress": True})
    prov = {**prov, "seconds": round(time.perf_counter() - start, 1)}
    return data, prov


def render(results: dict, args) -> str:
    lines = []
    for model in args.models:
        fp = results["fp"].get(f"{model}|{args.eval_limit or 'full'}")
        if fp is None:
            continue
        lines += [f"\n### {model} (FP top-1 {fp:.2f}%, {args.preset} preset, {args.calibration_size} calibration images, "
                  f"{'full test split' if not args.eval_limit else f'first {args.eval_limit} test images'})", "",
                  "| config | calibration | " + " | ".join(args.methods) + " |",
                  "|---|---|" + "---|" * len(args.methods)]
        for config in args.configs:
            for calibration in args.calibration:
                cells = []
                for method in args.methods:
                    cell = results["cells"].get(cell_key(args, model, config, calibration, method))
                    cells.append("" if cell is None else
                                 f"{cell['quant_top1']:.2f} ({cell['quant_top1'] - fp:+.2f}, {cell['seconds']:.0f} s)")
                if any(cells):
                    lines.append(f"| {config} | {calibration} | " + " | ".join(cells) + " |")
        lines += summary(results, args, model, fp)
    lines.append("\nCells: top-1 % (change vs FP in points, quantization wall time). Synthetic data generation "
                 "time is listed separately in the JSON (`data`).")
    return "\n".join(lines)


def summary(results: dict, args, model: str, fp: float) -> list[str]:
    """The issue's targets: best synthetic cell per config vs its drop budget, and synthetic vs real per method."""
    def top1(config, calibration, method):
        cell = results["cells"].get(cell_key(args, model, config, calibration, method))
        return None if cell is None else cell["quant_top1"]

    rows = []
    synthetic = [c for c in args.calibration if c != "real"]
    for config, budget in TARGETS.items():
        if config not in args.configs:
            continue
        found = [(top1(config, c, m), c, m) for c in synthetic for m in args.methods if top1(config, c, m) is not None]
        if not found:
            continue
        best, calibration, method = max(found)
        gaps = []
        for m in args.methods:
            real = top1(config, "real", m)
            synth = [t for t in (top1(config, c, m) for c in synthetic) if t is not None]
            if real is not None and synth:
                gaps.append(f"{m} {max(synth) - real:+.2f}")
        rows.append(f"| {config} | {best:.2f} ({calibration}, {method}) | {best - fp:+.2f} | -{budget} | "
                    f"{'met' if fp - best <= budget else 'NOT met'} | {', '.join(gaps) or '-'} |")
    if not rows:
        return []
    return ["", "Targets (synthetic data only, best method; first/last layer 8-bit):", "",
            "| config | best synthetic top-1 | vs FP | target | | best synthetic - real, per method |",
            "|---|---|---|---|---|---|", *rows]


def main(argv=None) -> int:
    args = parse_args(argv)
    path = Path(args.json)
    results = load_results(path)
    if args.table_only:
        print(render(results, args))
        return 0
    torch.set_num_threads(args.threads)
    import hub_dfq
    from hub_dfq.quant.registry import PRESETS

    preset = PRESETS.get(args.preset)
    test = hub_dfq.load_images(str(TEST), limit=args.eval_limit)
    for model_name in args.models:
        model = hub_dfq.load_model(f"local-dir:{MODELS[model_name]}")
        fp_key = f"{model_name}|{args.eval_limit or 'full'}"
        if fp_key not in results["fp"]:
            results["fp"][fp_key] = hub_dfq.evaluate_accuracy(model, test, progress=False)["top1"]
            save_results(path, results)
        for calibration in args.calibration:
            todo = [(c, m) for c in args.configs for m in args.methods
                    if cell_key(args, model_name, c, calibration, m) not in results["cells"]]
            if not todo:
                continue
            data, prov = calibration_data(model, calibration, args, preset)
            results["data"].setdefault(f"{model_name}|{calibration}|{args.calibration_size}", prov)
            for config, method in todo:
                weights, activations, first_last = CONFIGS[config]
                start = time.perf_counter()
                qmodel = hub_dfq.quantize(model, weights=weights, activations=activations, calibration=data,
                                          calibration_images=len(data), algorithm=method, preset=args.preset,
                                          first_last_bits=first_last,
                                          seed=args.seed)
                seconds = time.perf_counter() - start
                top1 = qmodel.evaluate(test, progress=False)["top1"]
                key = cell_key(args, model_name, config, calibration, method)
                results["cells"][key] = {"model": model_name, "config": config, "weights": weights,
                                         "activations": activations, "first_last_bits": first_last,
                                         "calibration": calibration, "method": method, "preset": args.preset,
                                         "fp_top1": results["fp"][fp_key], "quant_top1": top1,
                                         "seconds": round(seconds, 1), "calibration_size": len(data),
                                         "eval_limit": args.eval_limit, "seed": args.seed,
                                         "threads": args.threads}
                save_results(path, results)
                print(f"{key}: top-1 {top1:.2f} (FP {results['fp'][fp_key]:.2f}) in {seconds:.0f} s", flush=True)
    print(render(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
