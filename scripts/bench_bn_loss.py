"""Which BN loss to optimise on a real ImageNet model: the paper's KL against the reverse KL (``rkl``), side by side.

For each loss, on EfficientNet-Lite0 at 224 px: synthesise the ``fast`` preset's images for this model (64 BNS
images x 64 steps; empty cache), then report the per-layer BN divergence (always the paper's KL, so both losses
read on one scale) at the start and the end, the layers that dominate it, and the top-1 on the 500 shared
ImageNet images of W8A8 and W8A4 ``calibrate`` on those images, paired with the float model. Gaussian noise
calibration is the baseline row.

    python scripts/bench_bn_loss.py                         # about 15 minutes on 2 cores
    python scripts/bench_bn_loss.py --images 16 --iters 4 --limit 50    # smoke test

Writes a markdown table to stdout and JSON to scripts/results/bench_bn_loss.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "imagenet-efficientnet-lite0"
IMAGES = SHARED / "data" / "imagenet-sample" / "even-classes.parquet"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--losses", nargs="+", default=["kl", "rkl"])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--iters", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, help="evaluate on the first N images only")
    parser.add_argument("--top", type=int, default=5, help="layers listed per run")
    parser.add_argument("--json", default=str(ROOT / "scripts" / "results" / "bench_bn_loss.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["HUB_DFQ_CACHE"] = tempfile.mkdtemp(prefix="bench-bn-loss-")
    sys.path.insert(0, str(ROOT))
    import hub_dfq
    from hub_dfq.synth.api import synthesize_folder

    model = hub_dfq.load_model(f"local-dir:{MODEL}")
    data = hub_dfq.load_images(str(IMAGES), limit=args.limit)
    float_top1 = hub_dfq.evaluate_accuracy(model, data, progress=False)["top1"]
    out = Path(tempfile.mkdtemp(prefix="bench-bn-loss-out-"))
    rows = []
    for loss in ["gaussian", *args.losses]:
        row: dict = {"loss": loss}
        if loss == "gaussian":
            calibration = "gaussian"
        else:
            start = time.perf_counter()
            folder = synthesize_folder(model, "bns", args.images, iters=args.iters, batch_size=args.images, loss=loss,
                                       out_dir=out / loss, progress=False)
            row["synthesis_s"] = time.perf_counter() - start
            manifest = json.loads((folder / "generation.json").read_text())
            divergence = manifest["bn_divergence"]
            end = divergence["end"]["layers"]
            row.update(metric=divergence["metric"], start=divergence["start"]["total"], end=divergence["end"]["total"],
                       worst_layers=sorted(end.items(), key=lambda kv: -kv[1])[:args.top],
                       ms_per_image_iteration=1e3 * manifest["wall_time_s"] / (args.images * args.iters))
            calibration = hub_dfq.load_images(str(folder))
        for bits in (8, 4):
            qmodel = hub_dfq.quantize(model, weights=8, activations=bits, calibration=calibration,
                                      calibration_images=args.images, progress=False)
            row[f"W8A{bits}"] = hub_dfq.evaluate_accuracy(model, data, forward=qmodel, progress=False)["top1"]
        rows.append(row)
        print(f"# {json.dumps(row)}", file=sys.stderr, flush=True)
    command = "python " + " ".join(sys.argv)
    print(f"Command: `{command}` (torch {torch.__version__}, {args.threads} threads, "
          f"{platform.processor() or platform.machine()}); float top-1 {float_top1:.1f} on {data.num_rows} images\n")
    print("| calibration | BN-KL start | BN-KL end | ms / image-iteration | W8A8 top-1 | W8A4 top-1 | largest layers at the "
          "end (paper's KL) |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        worst = ", ".join(f"{name} {value:.2f}" for name, value in r.get("worst_layers", []))
        name = "Gaussian noise" if r["loss"] == "gaussian" else f"BNS, loss {r['loss']}"
        print(f"| {name} | {r.get('start', float('nan')):.1f} | {r.get('end', float('nan')):.2f} | "
              f"{r.get('ms_per_image_iteration', float('nan')):.1f} | {r['W8A8']:.1f} | {r['W8A4']:.1f} | {worst or '-'} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"command": command, "threads": args.threads, "float_top1": float_top1,
                                           "images": data.num_rows, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
