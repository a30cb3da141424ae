"""What the quantized-graph rules buy in ONNX Runtime: graph version 1, version 2 without output
quantizers, and version 2 (the default), side by side on the same models in one run.

Per model and variant: the share of MACs ONNX Runtime runs in integer kernels, its latency at batch 1
and its throughput at batch 8 (1 thread, medians, variants interleaved so that the ratios come from
the same moments), and what the extra quantization points cost: the logit error against the float
model relative to the float logits' spread, and on the real EfficientNet-Lite0 the top-1 on the 500
shared ImageNet images and the agreement of ONNX Runtime with the simulated model there.

    python scripts/bench_graph_rules.py                        # table in docs/coverage.md
    python scripts/bench_graph_rules.py --models tf_efficientnet_lite0 --repeats 10

Random-weight models are built as in ``scripts/coverage.py`` (BN statistics of random images) and
calibrated on 8 Gaussian images; Lite0 on 32 of the shared ImageNet images (an optimistic choice that
is the same for every variant: the comparison is between graphs, not calibration sets).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from coverage import IMAGENET, LITE0, settle_bn  # noqa: E402  (a sibling script)

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["tf_efficientnet_lite0", "efficientnet_b0", "mobilenetv3_large_100", "convnext_atto", "vit_tiny_patch16_224"]
VARIANTS = {"v1": {"graph_version": 1}, "v2, no output quantizers": {"output_quantizers": False},
            "v2": {}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--repeats", type=int, default=20, help="timed runs per measurement (median)")
    p.add_argument("--json", default=str(ROOT / "scripts" / "results" / "bench_graph_rules.json"))
    p.add_argument("--table-only", action="store_true")
    return p.parse_args(argv)


def load(name: str):
    import hub_dfq

    if name == "tf_efficientnet_lite0":
        return hub_dfq.load_model(str(LITE0))
    torch.manual_seed(0)  # the random weights
    model = hub_dfq.load_model(name, pretrained=False)
    settle_bn(model.module, model.input_size)
    return model


def _time(fn, x: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


@torch.no_grad()
def bench_model(name: str, args: argparse.Namespace, tmp: Path) -> list[dict]:
    import hub_dfq
    from hub_dfq.backends.onnx import compare_onnx, export_onnx, load_onnx
    from hub_dfq.backends.onnx_kernels import integer_macs
    from hub_dfq.quant.config import QuantConfig, QuantScheme
    from hub_dfq.quant.data import images_to_tensor

    model = load(name)
    generator = torch.Generator().manual_seed(0)
    labels = None
    if name == "tf_efficientnet_lite0":
        data = hub_dfq.load_images(str(IMAGENET))
        inputs = images_to_tensor(model, data)
        labels = torch.tensor(data.dataset[data.label_column][:len(inputs)])
        calibration = inputs[:32]
    else:
        inputs = torch.randn(32, *model.input_size, generator=generator)
        calibration = torch.randn(8, *model.input_size, generator=generator)
    reference = torch.cat([model.module(inputs[i:i + 50]) for i in range(0, len(inputs), 50)])
    spread = float((reference - reference.mean(-1, keepdim=True)).norm())
    rows, sessions = [], {}
    for variant, changes in VARIANTS.items():
        config = QuantConfig(default=QuantScheme(weights=8, activations=8), **changes)
        qmodel = hub_dfq.quantize(model, quant_config=config, calibration=calibration, progress=False)
        path = export_onnx(qmodel, tmp / f"{name}-{variant}.onnx")
        session = load_onnx(path, threads=1)
        simulated = torch.cat([qmodel(inputs[i:i + 50]) for i in range(0, len(inputs), 50)])
        row = {"model": name, "variant": variant, "integer_mac_share": integer_macs(path)["share"],
               "output_points": sum(p.kind == "output" for p in qmodel.report.act_points),
               "relative_logit_error": float((simulated - reference).norm()) / spread,
               "top1_agreement_with_float": float((simulated.argmax(-1) == reference.argmax(-1)).float().mean()),
               "ort_vs_simulated": compare_onnx(qmodel, session, inputs)["top1_agreement"], "n": len(inputs)}
        if labels is not None:
            row["top1"] = 100.0 * float((simulated.argmax(-1) == labels).float().mean())
            row["float_top1"] = 100.0 * float((reference.argmax(-1) == labels).float().mean())
        rows.append(row)
        sessions[variant] = session
    x1, x8 = inputs[:1].contiguous(), inputs[:8].contiguous()
    times: dict[str, dict[str, list[float]]] = {v: {"b1": [], "b8": []} for v in sessions}
    for session in sessions.values():  # warm-up
        session(x1), session(x8)
    for _ in range(args.repeats):  # interleaved: every variant sees the same moments of the machine
        for variant, session in sessions.items():
            times[variant]["b1"].append(_time(session, x1))
            times[variant]["b8"].append(_time(session, x8))
    for row in rows:
        row["batch1_ms"] = 1e3 * statistics.median(times[row["variant"]]["b1"])
        row["batch8_img_s"] = 8 / statistics.median(times[row["variant"]]["b8"])
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | graph | output quantizers | integer MACs | ORT batch 1 (ms) | ORT batch 8 (img/s) | "
             "speed vs v1 (batch 1 / 8) | logit error vs float | top-1 (500 images) | ORT = simulated |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = {r["model"]: r for r in rows if r["variant"] == "v1"}
    for r in rows:
        top1 = f"{r['top1']:.1f} (float {r['float_top1']:.1f})" if "top1" in r else "-"
        v1 = base.get(r["model"])
        speed = (f"{v1['batch1_ms'] / r['batch1_ms']:.2f}x / {r['batch8_img_s'] / v1['batch8_img_s']:.2f}x"
                 if v1 else "-")
        lines.append(f"| {r['model']} | {r['variant']} | {r['output_points']} | {100 * r['integer_mac_share']:.1f}% | "
                     f"{r['batch1_ms']:.1f} | {r['batch8_img_s']:.0f} | {speed} | "
                     f"{r['relative_logit_error']:.4f} | {top1} | {100 * r['ort_vs_simulated']:.1f}% of {r['n']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.json)
    if args.table_only:
        print(table(json.loads(out.read_text())["rows"]))
        return 0
    torch.set_num_threads(1)
    results = {"machine": {"torch": torch.__version__, "threads": 1, "cpu": platform.machine()},
               "repeats": args.repeats, "rows": []}
    with tempfile.TemporaryDirectory(prefix="hub-dfq-graph-rules-") as tmp:
        for name in args.models:
            start = time.perf_counter()
            results["rows"] += bench_model(name, args, Path(tmp))
            print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results["rows"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
