"""Real integer inference on CPU: latency and accuracy of the exported models vs float, per backend.

For each model: PyTorch float32 (eager), ONNX Runtime float32 (the float model exported the same
way), and ONNX Runtime running hub-dfq's QDQ export at W8A8, W4A8 and W4A4 (integer kernels), plus
the simulated PyTorch model for reference; with openvino installed, OpenVINO float32 (the same float
ONNX file) and OpenVINO running hub-dfq's OpenVINO IR of the same quantized models. Latency is the
median of repeated runs at batch 1 and the throughput at a larger batch, all in one process with the
same thread count, reported as ratios to ONNX Runtime float32. For the shared CIFAR-10 ResNets, top-1
on the full test split of the simulated and the integer models and how often their predictions agree.

    python scripts/bench_int8.py                      # CIFAR ResNet-20/44 + timm ResNet-18/50 at 224
    python scripts/bench_int8.py --models resnet20 --threads 1
    python scripts/bench_int8.py --engines ort openvino --threads 1

Calibration: BNS synthetic images (cached by hub_dfq.synth, 256, `calibrate` method) for the CIFAR
models; the 224-px timm models are built from their configs with random weights (nothing can be
downloaded here), calibrated on Gaussian noise, and measured for speed only.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CIFAR = {"resnet20": SHARED / "models" / "cifar10-resnet20", "resnet44": SHARED / "models" / "cifar10-resnet44"}
TIMM = {"resnet18": "resnet18", "resnet50": "resnet50"}
TEST = SHARED / "data" / "cifar10" / "test.parquet"
CONFIGS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4)}
INTEGER_OPS = ("QLinear", "QGemm", "MatMulInteger")
FLOAT_OPS = ("Conv", "FusedConv", "Gemm", "MatMul", "FusedMatMul")
OPENVINO_LAYERS = ("Convolution", "FullyConnected", "MatMul", "Eltwise")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=[*CIFAR, *TIMM], choices=[*CIFAR, *TIMM])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--engines", nargs="+", default=["ort", "openvino"], choices=["ort", "openvino"],
                   help="integer backends to time (openvino is skipped when it is not installed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30, help="timed runs per measurement (median)")
    p.add_argument("--eval-limit", type=int, help="evaluate on the first N test images (default: all 10,000)")
    p.add_argument("--json", default=str(ROOT / "scripts" / "results" / "bench_int8.json"))
    return p.parse_args(argv)


def load(name: str):
    import hub_dfq

    if name in CIFAR:
        return hub_dfq.load_model(str(CIFAR[name]))
    return hub_dfq.load_model(TIMM[name], pretrained=False)  # random weights: speed only


def timed(fn, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of ``fn(x)`` after warm-up."""
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def top1(fn, inputs: torch.Tensor, labels: torch.Tensor, batch: int = 250) -> float:
    predictions = torch.cat([fn(inputs[i:i + batch]).argmax(-1) for i in range(0, len(inputs), batch)])
    return 100.0 * float((predictions == labels).float().mean())


def export_float(model, path: Path) -> Path:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.module.eval(), (model.example_input(2),), str(path), dynamo=False, opset_version=17,
                          input_names=["pixel_values"], output_names=["logits"],
                          dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import hub_dfq
    from hub_dfq.backends.onnx import compare_onnx, export_onnx, load_onnx, runtime_ops
    from hub_dfq.quant.data import images_to_tensor

    results = {"machine": {"torch": torch.__version__, "threads": args.threads, "cpu": platform.processor() or
                           platform.machine()}, "rows": []}
    try:
        import onnxruntime

        results["machine"]["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        raise SystemExit("bench_int8 needs onnxruntime: pip install -e '.[onnx]'")
    openvino = "openvino" in args.engines and hub_dfq.BACKENDS.get("openvino").available()
    if openvino:
        import openvino as ov

        from hub_dfq.backends.openvino import export_openvino, load_openvino, runtime_precisions

        results["machine"]["openvino"] = ov.__version__
    tmp = Path(tempfile.mkdtemp(prefix="bench-int8-"))
    for name in args.models:
        model = load(name)
        cifar = name in CIFAR
        large_batch = 64 if cifar else 16
        x1, xb = model.example_input(1), torch.randn(large_batch, *model.input_size)
        test = labels = None
        if cifar:
            data = hub_dfq.load_images(str(TEST), limit=args.eval_limit)
            test = images_to_tensor(model, data)
            labels = torch.tensor(data.dataset[data.label_column][:len(test)])
        engines = {}
        engines["PyTorch fp32"] = (model.module, None)
        float_file = export_float(model, tmp / f"{name}-fp32.onnx")
        engines["ORT fp32"] = (load_onnx(float_file, threads=args.threads), None)
        if openvino:
            engines["OpenVINO fp32"] = (load_openvino(float_file, threads=args.threads), None)
        for config in args.configs:
            w, a = CONFIGS[config]
            calibration = ("bns", 256) if cifar else ("gaussian", 32)
            qmodel = hub_dfq.quantize(model, weights=w, activations=a, calibration=calibration[0],
                                      calibration_images=calibration[1])
            path = export_onnx(qmodel, tmp / f"{name}-{config}.onnx")
            engines[f"ORT {config}"] = (load_onnx(path, threads=args.threads), (qmodel, path, ()))
            if a < 8:  # the float residual path of mixed-width graphs costs layout transposes in NHWC
                nchw = ("NhwcTransformer",)
                engines[f"ORT {config} (NCHW)"] = (load_onnx(path, threads=args.threads, disabled_optimizers=nchw),
                                                   (qmodel, path, nchw))
            if openvino:  # the same quantized model: the ResNets' graphs are the same under both backends' rules
                xml = export_openvino(qmodel, tmp / f"{name}-{config}.xml")
                engines[f"OpenVINO {config}"] = (load_openvino(xml, threads=args.threads), (qmodel, xml, None))
            if config == args.configs[0]:
                engines[f"PyTorch {config} simulated"] = (qmodel, None)
        base = {}
        for engine, (fn, quant) in engines.items():
            with torch.no_grad():
                b1, bb = timed(fn, x1, args.repeats), timed(fn, xb, max(args.repeats // 3, 5))
            row = {"model": name, "engine": engine, "batch1_ms": 1e3 * b1, "batch": large_batch,
                   "throughput": large_batch / bb}
            if engine == "ORT fp32":
                base = {"batch1_ms": row["batch1_ms"], "throughput": row["throughput"]}
            if quant is not None:
                qmodel, path, disabled = quant
                if disabled is None:  # OpenVINO: the layers its CPU plugin runs in u8/i8 vs in f32
                    ops = runtime_precisions(fn)
                    layers = {k: v for k, v in ops.items() if k.split(":")[0] in OPENVINO_LAYERS}
                    row["integer_kernels"] = sum(v for k, v in layers.items() if k.endswith((":u8", ":i8")))
                    row["float_kernels"] = sum(v for k, v in layers.items()  # float adds are not counted for ORT
                                               if k.endswith(":f32") and not k.startswith("Eltwise"))
                else:
                    ops = runtime_ops(path, threads=args.threads, disabled_optimizers=disabled)
                    row["integer_kernels"] = sum(v for k, v in ops.items() if k.startswith(INTEGER_OPS))
                    row["float_kernels"] = sum(v for k, v in ops.items() if k in FLOAT_OPS)
                if test is not None:
                    row.update(compare_onnx(qmodel, fn, test))
            if test is not None:
                row["top1"] = top1(fn, test, labels)
            results["rows"].append(row)
            print(f"{name:9s} {engine:24s} batch 1 {row['batch1_ms']:8.2f} ms   batch {large_batch} "
                  f"{row['throughput']:8.0f} img/s" + (f"   top-1 {row['top1']:.2f}" if "top1" in row else ""),
                  flush=True)
        for row in results["rows"]:
            if row["model"] == name and base:
                row["speedup_batch1"] = base["batch1_ms"] / row["batch1_ms"]
                row["speedup_throughput"] = row["throughput"] / base["throughput"]
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(render(results))
    return 0


def render(results: dict) -> str:
    m = results["machine"]
    engines = f"onnxruntime {m.get('onnxruntime')}" + (f", openvino {m['openvino']}" if m.get("openvino") else "")
    lines = [f"torch {m['torch']}, {engines}, {m['threads']} threads", "",
             "| model | engine | batch 1 (ms) | vs ORT fp32 | throughput (img/s) | vs ORT fp32 | integer / float kernels "
             "| top-1 | agrees with simulated |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in results["rows"]:
        kernels = f"{r['integer_kernels']} / {r['float_kernels']}" if "integer_kernels" in r else ""
        top1 = f"{r['top1']:.2f}" if "top1" in r else ""
        agree = f"{100 * r['top1_agreement']:.2f}%" if "top1_agreement" in r else ""
        lines.append(f"| {r['model']} | {r['engine']} | {r['batch1_ms']:.2f} | {r.get('speedup_batch1', 0):.2f}x | "
                     f"{r['throughput']:.0f} | {r.get('speedup_throughput', 0):.2f}x | {kernels} | {top1} | {agree} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
