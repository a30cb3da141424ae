"""The GPU path on EfficientNet-Lite0: synthesis, reconstruction, an audit and an evaluation on CUDA.

Run it on any machine with a CUDA GPU (the CPU path is what the test suite covers):

    python scripts/gpu_check.py [--device cuda:0] [--images 64] [--json scripts/results/gpu_check.json]
    python scripts/gpu_check.py --device cpu --images 8 --iters 2 --reconstruct-iters 2 --json /tmp/g.json  # on a CPU

It prints, for each step, the wall time and the result (BN divergence, top-1 of float, W8A8 and W4A8 on the 500
shared ImageNet images, the audit ranking), with the CPU's numbers for the same small budgets when
``--compare-cpu`` is given. Without a GPU it says so and exits with code 3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def run(device: str, images: int, iters: int, out: Path, reconstruct_iters: int = 100, *, shared: Path = SHARED,
        depthwise_weights: int | None = None, skip_audit: bool = False) -> dict:
    import torch

    import hub_dfq
    from hub_dfq.synth.api import synthesize_folder

    model_dir = shared / "models" / "imagenet-efficientnet-lite0"
    images_file = shared / "data" / "imagenet-sample" / "even-classes.parquet"
    result: dict = {"device": device}
    if device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name(torch.device(device))
    model = hub_dfq.load_model(f"local-dir:{model_dir}", device=device)
    data = hub_dfq.load_images(str(images_file))

    start = time.perf_counter()
    folder = synthesize_folder(model, "bns", images, iters=iters, batch_size=min(images, 64),
                                                 out_dir=out / f"synth-{device.replace(':', '-')}", device=device)
    manifest = json.loads((folder / "generation.json").read_text())
    result["synth"] = {"seconds": time.perf_counter() - start, "images": images, "iters": iters,
                       "bn_divergence_end": manifest["bn_divergence"]["end"]["total"],
                       "precision": manifest["arguments"]["precision"]}

    start = time.perf_counter()
    fp = hub_dfq.evaluate_accuracy(model, data, device=device, progress=False)
    result["eval_float"] = {"seconds": time.perf_counter() - start, "top1": fp["top1"], "n": fp["n"]}

    start = time.perf_counter()
    qmodel = hub_dfq.quantize(model, weights=8, activations=8, calibration=hub_dfq.load_images(str(folder)),
                              calibration_images=images, device=device, progress=False)
    result["quantize_w8a8_calibrate"] = {"seconds": time.perf_counter() - start,
                                         "top1": qmodel.evaluate(data, progress=False)["top1"]}

    start = time.perf_counter()
    # why: 4-bit depthwise 3x3 kernels are what keeps W4A8 far from float on this model (docs/imagenet.md)
    overrides = {"*conv_dw": {"weights": depthwise_weights}} if depthwise_weights else None
    qmodel = hub_dfq.quantize(model, weights=4, activations=8, calibration=hub_dfq.load_images(str(folder)),
                              calibration_images=images, algorithm="reconstruct", overrides=overrides,
                              settings={"reconstruct": {"iters": reconstruct_iters, "batch_size": 16}}, device=device,
                              progress=False)
    quant = qmodel.evaluate(data, progress=False)
    result["quantize_w4a8_reconstruct"] = {"seconds": time.perf_counter() - start, "top1": quant["top1"],
                                           "iters_per_block": reconstruct_iters,
                                           "depthwise_weights": depthwise_weights or 4,
                                           "left_in_float": qmodel.left_in_float}
    if skip_audit:
        return result

    start = time.perf_counter()
    report = hub_dfq.audit(model, {"imagenet": str(images_file), "synthetic": str(folder)}, references="gaussian",
                           device=device, progress=False)
    result["audit"] = {"seconds": time.perf_counter() - start,
                       "ranking": [(c.dataset, c.divergence, c.similarity) for c in report.ranking()]}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--reconstruct-iters", type=int, default=100, help="reconstruction steps per block")
    parser.add_argument("--depthwise-weights", type=int,
                        help="weight bits of the depthwise convs (default: 4, as the rest)")
    parser.add_argument("--skip-audit", action="store_true")
    parser.add_argument("--shared", default=str(SHARED), help="folder holding models/imagenet-efficientnet-lite0 "
                                                              "and data/imagenet-sample (default ../shared)")
    parser.add_argument("--compare-cpu", action="store_true")
    parser.add_argument("--json", default=str(ROOT / "scripts" / "results" / "gpu_check.json"))
    args = parser.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing was run")
        return 3
    os.environ.setdefault("HUB_DFQ_CACHE", tempfile.mkdtemp(prefix="hub-dfq-gpu-check-"))
    out = Path(tempfile.mkdtemp(prefix="hub-dfq-gpu-check-out-"))
    options = {"shared": Path(args.shared), "depthwise_weights": args.depthwise_weights, "skip_audit": args.skip_audit}
    results = [run(args.device, args.images, args.iters, out, args.reconstruct_iters, **options)]
    if args.compare_cpu:
        results.append(run("cpu", args.images, args.iters, out, args.reconstruct_iters, **options))
    for result in results:
        print(json.dumps(result, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
