"""A real ImageNet model end to end: hub-dfq data-free quantization of EfficientNet-Lite0 next to ONNX
Runtime's ``quantize_static`` calibrated on real images, on the 500 shared ImageNet images.

Rows, all paired with the float model on the same 500 images (one image per even class):

- hub-dfq, data-free: synthetic calibration (``bns+p``, the default, ``bns`` and ``gaussian``), W8A8
  ``calibrate``, W4A8 and W4A4 ``reconstruct`` (preset ``fast`` unless ``--preset``); synthesis runs from an
  empty cache and its time is reported next to the quantization time;
- hub-dfq on real images (``hub-real-*``): a control that tells the synthetic data's share of a gap from the
  algorithm's, calibrated on the first ``--real-images`` evaluation images (optimistic, as the ONNX Runtime
  rows) and also scored on the evaluation images it did not see (a second, smaller table);
- ONNX Runtime ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations) with its MinMax,
  Entropy and Percentile calibrators, **calibrated on the evaluation images themselves** (all 500 for
  MinMax; the first 128 for Entropy and Percentile, which hold every activation of every image in memory and
  were killed at 24 GB with 500): what users do today, and an optimistic peer (it saw the test images).

Columns: top-1, agreement with the float model's predictions, wall time, and int8 latency in ONNX
Runtime at batch 1 and 32 (median; same thread count for every engine), plus the share of MACs that
ONNX Runtime runs in integer kernels.

    python scripts/bench_imagenet.py                               # everything (about an hour on 2 cores)
    python scripts/bench_imagenet.py --rows hub-bns-W8A8 ort-minmax --skip-latency
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_int8 import export_float, timed  # the CIFAR table's float export and latency measure

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "imagenet-efficientnet-lite0"
IMAGES = SHARED / "data" / "imagenet-sample" / "even-classes.parquet"
RESULTS = ROOT / "scripts" / "results" / "bench_imagenet.json"

# name -> (weights, activations, algorithm, size budget as a ratio of the uniform 4-bit checkpoint)
CONFIGS = {"W8A8": (8, 8, "auto", None), "W4A8": (4, 8, "auto", None), "W4A4": (4, 4, "auto", None),
           "W4A8-gptq": (4, 8, "gptq", None), "W4A8-calibrate": (4, 8, "calibrate", None),
           "W4A8-size1.05": (4, 8, "auto", 1.05), "W4A8-size1.25": (4, 8, "auto", 1.25)}
HUB_ROWS = {f"hub-{cal}-{cfg}": (cal, cfg) for cal in ("bns+p", "bns", "gaussian", "real") for cfg in CONFIGS}
DEFAULT_ROWS = [f"hub-{cal}-{cfg}" for cal in ("bns+p", "bns", "real") for cfg in CONFIGS] + \
    [f"hub-gaussian-{cfg}" for cfg in ("W8A8", "W4A8")]
ORT_ROWS = {"ort-minmax": "MinMax", "ort-entropy": "Entropy", "ort-percentile": "Percentile"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", choices=[*HUB_ROWS, *ORT_ROWS], default=[*DEFAULT_ROWS, *ORT_ROWS])
    p.add_argument("--real-images", type=int, default=256,
                   help="evaluation images the real-data control rows calibrate on (default 256)")
    p.add_argument("--time-budget", help="each hub-dfq row's --time-budget (default: the preset's target)")
    p.add_argument("--preset", default="fast")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20, help="timed runs per latency (median)")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--limit", type=int, help="evaluate on the first N images only (smoke tests)")
    p.add_argument("--histogram-images", type=int, default=128,
                   help="real images ORT's Entropy and Percentile calibrators see (they hold every activation)")
    p.add_argument("--json", default=str(RESULTS))
    return p.parse_args(argv)


@torch.no_grad()
def predictions(fn, inputs: torch.Tensor, batch: int = 50) -> torch.Tensor:
    return torch.cat([fn(inputs[i:i + batch]).argmax(-1) for i in range(0, len(inputs), batch)])


class _Reader:
    """An ONNX Runtime ``CalibrationDataReader`` over normalised inputs."""

    def __init__(self, inputs: torch.Tensor, batch: int = 32):
        # equal batches: ORT's histogram collectors stack them and fail on a shorter last one
        batch = max(b for b in range(1, batch + 1) if len(inputs) % b == 0)
        self.batches = [inputs[i:i + batch].numpy() for i in range(0, len(inputs), batch)]
        self.index = 0

    def get_next(self):
        if self.index >= len(self.batches):
            return None
        self.index += 1
        return {"pixel_values": self.batches[self.index - 1]}

    def rewind(self):
        self.index = 0


def integer_mac_share(path: Path, threads: int) -> float:
    from hub_dfq.backends.onnx_kernels import integer_macs  # the coverage script's measure

    return integer_macs(path, threads=threads)["share"]


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_gib() -> float:
    """Peak resident memory of this process since :func:`reset_peak_rss` (VmHWM), in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    import hub_dfq
    from hub_dfq.backends.onnx import export_onnx, load_onnx
    from hub_dfq.quant.data import images_to_tensor

    cache = Path(tempfile.mkdtemp(prefix="bench-imagenet-cache-"))
    os.environ["HUB_DFQ_CACHE"] = str(cache)  # an empty cache: synthesis is part of the measured cost
    model = hub_dfq.load_model(f"local-dir:{MODEL}")
    data = hub_dfq.load_images(str(IMAGES), limit=args.limit)
    inputs = images_to_tensor(model, data)
    labels = torch.tensor(data.dataset[data.label_column][:len(inputs)])
    float_pred = predictions(model.module, inputs)
    results = {"command": "python " + " ".join(sys.argv), "model": str(MODEL), "images": len(inputs),
               "threads": args.threads, "preset": args.preset,
               "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "float_top1": 100.0 * float((float_pred == labels).float().mean()), "rows": {}}
    tmp = Path(tempfile.mkdtemp(prefix="bench-imagenet-"))
    ort = __import__("onnxruntime")
    float_path = export_float(model, tmp / "float.onnx")
    float_session = load_onnx(float_path, threads=args.threads)
    if not args.skip_latency:
        results["float_latency_ms"] = {b: 1e3 * timed(float_session, inputs[:b], args.repeats) for b in (1, 32)}
    synth_seconds: dict[str, float] = {}
    for row in args.rows:
        reset_peak_rss()
        start = time.perf_counter()
        if row in HUB_ROWS:
            calibration, config = HUB_ROWS[row]
            weights, activations, algorithm, size_ratio = CONFIGS[config]
            before = set(cache.glob("synth/*"))
            source = inputs[:args.real_images] if calibration == "real" else calibration
            size_budget = None
            if size_ratio is not None:  # bytes of the uniform 4-bit checkpoint (first/last layer 8-bit) x ratio
                from hub_dfq.quant.allocate import checkpoint_bytes
                from hub_dfq.quant.config import QuantConfig, QuantScheme
                from hub_dfq.quant.prepare import prepare

                uniform = prepare(model.module, QuantConfig(default=QuantScheme(4, 8)), example_input=inputs[:1])
                size_budget = int(checkpoint_bytes(uniform.module) * size_ratio)
            qmodel = hub_dfq.quantize(model, weights=weights, activations=activations, calibration=source,
                                      algorithm=algorithm, preset=args.preset, size_budget=size_budget,
                                      time_budget=args.time_budget, progress=False)
            seconds = time.perf_counter() - start
            if set(cache.glob("synth/*")) - before:  # this row paid for the synthesis
                synth_seconds[calibration] = qmodel.history["seconds"]["data"]
            path = export_onnx(qmodel, tmp / f"{row}.onnx")
            pred = predictions(qmodel, inputs)
            extra = {"synthesis_s": synth_seconds.get(calibration), "left_in_float": qmodel.left_in_float,
                     "end_to_end_s": seconds if calibration in synth_seconds else None,
                     "algorithm": qmodel.algorithm, "budget": qmodel.history.get("budget"),
                     "checkpoint_bytes": (qmodel.history.get("allocation") or {}).get("bytes"),
                     "calibration_images": len(source) if calibration == "real" else qmodel.calibration.get("n")}
        else:
            from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

            path = tmp / f"{row}.onnx"
            # ORT's histogram calibrators keep every activation of every image in memory (500 images: > 24 GB,
            # killed): they see the first --histogram-images evaluation images, MinMax sees all of them
            seen = inputs if row == "ort-minmax" else inputs[:args.histogram_images]
            quantize_static(str(float_path), str(path), _Reader(seen), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=getattr(CalibrationMethod, ORT_ROWS[row]))
            seconds = time.perf_counter() - start
            pred = predictions(load_onnx(path, threads=args.threads), inputs)
            extra = {"calibrated_on": f"{len(seen)} of the evaluation images (real data, optimistic peer)",
                     "calibration_images": len(seen)}
        if row in HUB_ROWS and calibration == "real":  # also scored on the images it did not calibrate on
            unseen = slice(args.real_images, None)
            extra["unseen_images"] = len(labels[unseen])
            extra["unseen_top1"] = 100.0 * float((pred[unseen] == labels[unseen]).float().mean())
            extra["unseen_float_top1"] = 100.0 * float((float_pred[unseen] == labels[unseen]).float().mean())
        session = load_onnx(path, threads=args.threads)
        record = {"top1": 100.0 * float((pred == labels).float().mean()),
                  "agreement": 100.0 * float((pred == float_pred).float().mean()), "seconds": seconds,
                  "onnx_top1": 100.0 * float((predictions(session, inputs) == labels).float().mean()),
                  "integer_mac_share": integer_mac_share(path, args.threads), "peak_rss_gib": peak_rss_gib(), **extra}
        if not args.skip_latency:
            record["latency_ms"] = {b: 1e3 * timed(session, inputs[:b], args.repeats) for b in (1, 32)}
        results["rows"][row] = record
        print(f"{row}: {json.dumps(record)}", flush=True)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    del ort
    print(table(results))
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)


def _ms(latency: dict | None, batch: int) -> float:
    latency = latency or {}
    return latency.get(batch, latency.get(str(batch), float("nan")))  # int keys, or str after a JSON round trip


def table(results: dict) -> str:
    lines = [f"EfficientNet-Lite0, {results['images']} shared ImageNet images, "
             f"float top-1 {results['float_top1']:.1f}%, {results['threads']} threads, preset {results['preset']}",
             "",
             "| row | algorithm | images | top-1 (simulated) | drop | top-1 (ORT int8) | agreement with float "
             "| wall time (s) | synthesis (s) | int8 MAC share | latency b=1 (ms) | latency b=32 (ms) "
             "| peak RSS (GiB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    float_latency = results.get("float_latency_ms") or {}
    lines.append(f"| float (PyTorch / ORT fp32) | - | - | {results['float_top1']:.1f} | - | - | 100 | - | - | 0 | "
                 f"{_ms(float_latency, 1):.1f} | {_ms(float_latency, 32):.0f} | - |")
    for name, r in results["rows"].items():
        lat = r.get("latency_ms") or {}
        synth = r.get("synthesis_s")
        lines.append(f"| {name} | {r.get('algorithm', 'ort')} | {r.get('calibration_images', '-')} | {r['top1']:.1f} | "
                     f"{r['top1'] - results['float_top1']:+.1f} | {r['onnx_top1']:.1f} | {r['agreement']:.1f} | "
                     f"{r['seconds']:.0f} | "
                     f"{'-' if synth is None else f'{synth:.0f}'} | {r['integer_mac_share']:.2f} | "
                     f"{_ms(lat, 1):.1f} | {_ms(lat, 32):.0f} | "
                     f"{r.get('peak_rss_gib', float('nan')):.1f} |")
    unseen = {name: r for name, r in results["rows"].items() if r.get("unseen_images")}
    if unseen:
        lines += ["", "Real-image rows on the evaluation images they were not calibrated on:", "",
                  "| row | images | float top-1 | top-1 (simulated) | drop |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {name} | {r['unseen_images']} | {r['unseen_float_top1']:.1f} | {r['unseen_top1']:.1f} | "
                  f"{r['unseen_top1'] - r['unseen_float_top1']:+.1f} |" for name, r in unseen.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
