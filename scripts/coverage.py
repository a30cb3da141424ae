"""Architecture coverage: which timm / transformers families load, synthesise, quantize, run int8 and reload.

One row per family, every step on a tiny budget (the point is whether each step works and how much of
the model ONNX Runtime runs in integer kernels, not accuracy):

- loads: the model from a timm registry name or a transformers config (random weights; BN scale and
  shift 1 and 0, running statistics set by forward passes over random images in train mode, so they
  are not 0/1), or the real EfficientNet-Lite0 in ``../shared``;
- synth bns: a few BNS images for a few steps, or the error a model without BN gets;
- quantize W8A8: calibrated on those images (Gaussian noise for models without BN);
- simulated vs ONNX Runtime: top-1 agreement (real ImageNet images for Lite0, Gaussian inputs
  otherwise), and how far ONNX Runtime's logits are from the simulated ones relative to how far
  quantization moved the simulated ones from the float model's (L2 norms over all logits). Integer
  kernels differ from the simulation by one step where a value sits on a rounding boundary (rare:
  fewer than 1 in 20,000 values after ResNet-18's first convolution); random-weight networks amplify
  such steps layer after layer, trained ones do not (Lite0), and random-weight logits are nearly
  tied, so on random models the ratio says more than the top-1;
- integer MACs: the share of the model's MACs ONNX Runtime runs in integer kernels
  (``hub_dfq.backends.onnx_kernels.integer_macs``);
- reload: ``save_pretrained`` then ``from_pretrained`` gives bit-identical logits;
- in float: what stays in floating point, by reason.

    python scripts/coverage.py                        # the table in docs/coverage.md
    python scripts/coverage.py --models resnet18 vit_tiny_patch16_224 --graph-version 1   # the old graph rules

Prints the markdown table and writes ``scripts/results/coverage.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
LITE0 = SHARED / "models" / "imagenet-efficientnet-lite0"
IMAGENET = SHARED / "data" / "imagenet-sample" / "even-classes.parquet"


@dataclass(frozen=True)
class Family:
    """One row: a label, where the model comes from, and how to build it."""

    name: str
    source: str  # "timm", "transformers" or "shared"
    build: Callable[[Path], Any]
    note: str = ""


def settle_bn(module: torch.nn.Module, input_size: tuple[int, ...], *, batches: int = 2, batch: int = 8) -> None:
    """Set BN running statistics to those of random images (cumulative average over train-mode passes).

    The BN scale and shift are reset to 1 and 0 first: some initialisations zero the last BN of a
    residual branch (timm's ResNets) or draw tiny scales (transformers' EfficientNet: logits of 1e-35),
    which leaves a network whose quantization says nothing.
    """
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for m in bns:
        m.reset_parameters()
        m.momentum = None
    generator = torch.Generator().manual_seed(0)
    module.train()
    with torch.no_grad():
        for _ in range(batches):
            module(torch.randn(batch, *input_size, generator=generator))
    module.eval()


def _timm(name: str) -> Callable[[Path], Any]:
    def build(_tmp: Path):
        import hub_dfq

        torch.manual_seed(0)  # the random weights
        model = hub_dfq.load_model(name, pretrained=False)
        settle_bn(model.module, model.input_size)
        return model

    return build


def _transformers(config_name: str, size: int, **config: Any) -> Callable[[Path], Any]:
    def build(tmp: Path):
        import transformers
        from transformers import AutoModelForImageClassification, ViTImageProcessor

        import hub_dfq

        torch.manual_seed(0)
        cfg = getattr(transformers, config_name)(num_labels=10, **config)
        module = AutoModelForImageClassification.from_config(cfg).eval()
        settle_bn(module, (3, size, size))
        folder = tmp / config_name
        module.save_pretrained(folder)
        ViTImageProcessor(size={"height": size, "width": size}).save_pretrained(folder)
        return hub_dfq.load_model(folder)

    return build


def _lite0(_tmp: Path):
    import hub_dfq

    return hub_dfq.load_model(str(LITE0))


TINY = "64 px, 10 classes"
FAMILIES = [
    Family("resnet18", "timm", _timm("resnet18")),
    Family("resnet50", "timm", _timm("resnet50")),
    Family("mobilenetv2_100", "timm", _timm("mobilenetv2_100")),
    Family("mobilenetv3_large_100", "timm", _timm("mobilenetv3_large_100")),
    Family("efficientnet_b0", "timm", _timm("efficientnet_b0")),
    Family("tf_efficientnet_lite0", "shared", _lite0, "real ImageNet weights"),
    Family("regnety_002", "timm", _timm("regnety_002")),
    Family("densenet121", "timm", _timm("densenet121")),
    Family("convnext_atto", "timm", _timm("convnext_atto")),
    Family("vit_tiny_patch16_224", "timm", _timm("vit_tiny_patch16_224")),
    Family("deit_tiny_patch16_224", "timm", _timm("deit_tiny_patch16_224")),
    Family("hf-resnet", "transformers",
           _transformers("ResNetConfig", 64, embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                         layer_type="bottleneck"),
           f"{TINY}; widths 16-128, 1 bottleneck block per stage"),
    Family("hf-mobilenet_v2", "transformers", _transformers("MobileNetV2Config", 96, depth_multiplier=0.35,
                                                             image_size=96),
           "96 px, 10 classes; depth multiplier 0.35, TF padding"),
    Family("hf-efficientnet", "transformers",
           _transformers("EfficientNetConfig", 64, image_size=64, width_coefficient=0.25, depth_coefficient=0.5,
                         hidden_dim=320),
           f"{TINY}; width 0.25, depth 0.5"),
    Family("hf-convnext", "transformers",
           _transformers("ConvNextConfig", 64, image_size=64, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1]),
           f"{TINY}; widths 16-128, 1 block per stage"),
    Family("hf-vit", "transformers",
           _transformers("ViTConfig", 64, image_size=64, patch_size=16, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=128),
           f"{TINY}; patch 16, width 64, 2 layers"),
    Family("hf-swin", "transformers",
           _transformers("SwinConfig", 64, image_size=64, patch_size=4, embed_dim=16, depths=[1, 1],
                         num_heads=[1, 2], window_size=4),
           f"{TINY}; patch 4, width 16, 2 stages, window 4"),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=[f.name for f in FAMILIES], choices=[f.name for f in FAMILIES])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--synth-images", type=int, default=4)
    p.add_argument("--synth-iters", type=int, default=2)
    p.add_argument("--compare", type=int, default=16, help="inputs to compare simulated and ONNX Runtime on")
    p.add_argument("--real-compare", type=int, default=100, help="real ImageNet images to compare Lite0 on")
    p.add_argument("--graph-version", type=int, help="quantized-graph rules (default: the newest)")
    p.add_argument("--no-output-quantizers", action="store_true")
    p.add_argument("--json", default=str(ROOT / "scripts" / "results" / "coverage.json"))
    p.add_argument("--table-only", action="store_true", help="print the table of an existing JSON")
    return p.parse_args(argv)


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    return re.sub(r"\s+", " ", text)[:300]


def _float_summary(qmodel) -> str:
    """What stays in float, counted by reason, e.g. '8 LayerNorm (by design)'."""
    counts: Counter[str] = Counter()
    for entry in qmodel.report.float_by_design:
        kind = entry.split("(", 1)[1].split(":")[0].split(" ")[0].rstrip(")")
        counts[f"{kind} (by design)" if kind != "a" else "learned tensors (by design)"] += 1
    for entry in qmodel.report.unsupported:
        counts[f"{entry.split('(', 1)[1].split(':')[0].split(',')[0].rstrip(')')} (unsupported)"] += 1
    counts.update(f"{name} (excluded)" for name in qmodel.report.excluded)
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing"


def run_family(family: Family, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import hub_dfq
    from hub_dfq.backends.onnx import compare_onnx, export_onnx, load_onnx
    from hub_dfq.backends.onnx_kernels import integer_macs
    from hub_dfq.errors import UnsupportedModelError
    from hub_dfq.hub.checkpoint import from_pretrained, save_pretrained
    from hub_dfq.quant.config import GRAPH_VERSION, QuantConfig, QuantScheme
    from hub_dfq.quant.data import images_to_tensor
    from hub_dfq.synth.api import synthesize_folder

    row: dict[str, Any] = {"family": family.name, "source": family.source, "note": family.note}
    start = time.perf_counter()
    work = tmp / family.name
    work.mkdir()
    try:
        model = family.build(work)
    except Exception as err:  # noqa: BLE001 - a row records its failure, the table goes on
        row["loads"] = _short(err)
        row["seconds"] = time.perf_counter() - start
        return row
    row["loads"] = "yes"
    row["input_size"] = list(model.input_size)
    try:
        folder = synthesize_folder(model, "bns", args.synth_images, iters=args.synth_iters,
                                   batch_size=args.synth_images, out_dir=work / "bns", progress=False)
        row["synth_bns"] = "yes"
        calibration: Any = str(folder)
    except UnsupportedModelError as err:
        row["synth_bns"] = "no BN: " + str(err)
        calibration = "gaussian"
    except Exception as err:  # noqa: BLE001
        row["synth_bns"] = _short(err)
        calibration = "gaussian"
    config = QuantConfig(default=QuantScheme(weights=8, activations=8),
                         graph_version=args.graph_version or GRAPH_VERSION,
                         output_quantizers=not args.no_output_quantizers)
    try:
        qmodel = hub_dfq.quantize(model, quant_config=config, calibration=calibration,
                                  calibration_images=args.synth_images, progress=False)
        row["quantize"] = "yes"
        row["in_float"] = _float_summary(qmodel)
        row["left_in_float"] = qmodel.left_in_float
    except Exception as err:  # noqa: BLE001
        row["quantize"] = _short(err)
        row["seconds"] = time.perf_counter() - start
        traceback.print_exc()
        return row
    if family.source == "shared" and IMAGENET.is_file():
        inputs = images_to_tensor(model, hub_dfq.load_images(str(IMAGENET), limit=args.real_compare))
        row["compare_on"] = f"{len(inputs)} ImageNet images"
    else:
        inputs = torch.randn(args.compare, *model.input_size, generator=torch.Generator().manual_seed(1))
        row["compare_on"] = f"{len(inputs)} Gaussian inputs"
    try:
        path = export_onnx(qmodel, work / "model.onnx")
        session = load_onnx(path, threads=args.threads)
        agreement = compare_onnx(qmodel, session, inputs)
        with torch.no_grad():
            simulated, reference, integer = qmodel(inputs), model.module(inputs), session(inputs)
        row["top1_agreement"] = agreement["top1_agreement"]
        row["max_logit_diff"] = agreement["max_abs_logit_diff"]
        # how far ONNX Runtime is from the simulation, against how far quantization moved the logits
        row["quantization_error"] = float((simulated - reference).norm())
        row["integer_error"] = float((integer - simulated).norm())
        row["integer_vs_quantization_error"] = row["integer_error"] / max(row["quantization_error"], 1e-12)
        macs = integer_macs(path, threads=args.threads)
        row["integer_mac_share"] = macs["share"]
        row["gmacs"] = macs["total"] / 1e9
        row["float_macs"] = [[name, op, count] for name, op, count in macs["float_layers"][:5]]
    except Exception as err:  # noqa: BLE001
        row["onnx"] = _short(err)
        traceback.print_exc()
    try:
        saved = save_pretrained(qmodel, work / "checkpoint")
        reloaded = from_pretrained(saved)
        with torch.no_grad():
            row["reload_bit_exact"] = bool(torch.equal(qmodel(inputs[:4]), reloaded(inputs[:4])))
    except Exception as err:  # noqa: BLE001
        row["reload_bit_exact"] = _short(err)
        traceback.print_exc()
    row["seconds"] = time.perf_counter() - start
    return row


def _cell(value: Any, fmt: str = "{}") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    return fmt.format(value)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| family | source | loads | synth bns | quantize W8A8 | sim vs ORT top-1 | ORT - sim / sim - float | "
             "integer MACs | reload bit-exact | in float | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        source = r["source"] + (f" ({r['note']})" if r.get("note") else "")
        synth = r.get("synth_bns", "-")
        if synth.startswith("no BN"):
            working = re.search(r"methods that work for this model: ([^.;]*)", synth)
            synth = f"no BN; error names {working.group(1).strip()}" if working else "no BN"
        agreement = r.get("top1_agreement")
        agree = f"{100 * agreement:.1f}% ({r['compare_on']})" if agreement is not None else r.get("onnx", "-")
        share = r.get("integer_mac_share")
        mmacs = r.get("gmacs", 0) * 1e3
        macs = f"{100 * share:.1f}% of {mmacs:,.0f} M" if share is not None else "-"
        lines.append(
            f"| {r['family']} | {source} | {r['loads']} | {synth} | {r.get('quantize', '-')} | {agree} | "
            f"{_cell(r.get('integer_vs_quantization_error'), '{:.2f}')} | "
            f"{macs} | "
            f"{_cell(r.get('reload_bit_exact'))} | {r.get('in_float', '-')} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.json)
    if args.table_only:
        print(table(json.loads(out.read_text())["rows"]))
        return 0
    torch.set_num_threads(args.threads)
    import hub_dfq

    results: dict[str, Any] = {
        "machine": {"torch": torch.__version__, "threads": args.threads, "cpu": platform.machine(),
                    "hub_dfq": hub_dfq.__version__},
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "models", "table_only")},
        "rows": []}
    total = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hub-dfq-coverage-") as tmp:
        for family in FAMILIES:
            if family.name not in args.models:
                continue
            row = run_family(family, args, Path(tmp))
            results["rows"].append(row)
            print(f"{row['family']}: {row.get('quantize', row['loads'])}, integer MACs "
                  f"{row.get('integer_mac_share')}, reload {row.get('reload_bit_exact')}, {row['seconds']:.0f} s",
                  flush=True)
    results["seconds"] = time.perf_counter() - total
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results["rows"]))
    print(f"\n{results['seconds']:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
