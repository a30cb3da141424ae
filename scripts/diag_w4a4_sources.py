#!/usr/bin/env python
"""Where synthetic calibration images lose points against real ones at W4A4 (issue #18): ranges or weights, and
which stages' weights.

Quantizes an EfficientNet-Lite twice with the same settings, on synthetic images (`bns+p`, N x STEPS, seed 0) and on
the first 250 of the evaluation images, then scores on the other 250 (paired with float, KL from float):

- each model with the other's activation quantizers (scale and zero point): are the ranges or the weights worse?
- the synthetic model with the real model's weight layers of one stage (`conv_stem`, `blocks.0`, ... `classifier`),
  and with those of every stage up to it: which stages' weights carry the gap?

    python scripts/diag_w4a4_sources.py --images 512 --steps 50 --algorithm gptq

A diagnostic that reads real images to explain a gap, not a way to choose anything: the product never sees them.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from ablate_w4a4 import kl_from, logits_of  # scripts/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=f"local-dir:{SHARED / 'models' / 'imagenet-efficientnet-lite0'}")
    p.add_argument("--eval", default=str(SHARED / "data" / "imagenet-sample" / "even-classes.parquet"))
    p.add_argument("--images", type=int, default=512, help="synthetic calibration images")
    p.add_argument("--steps", type=int, default=50, help="synthesis steps per image")
    p.add_argument("--real", type=int, default=250, help="real calibration images (the first ones; the rest score)")
    p.add_argument("--algorithm", default="gptq")
    p.add_argument("--iters", type=int, default=75, help="fitting steps per block (reconstruct)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=str(ROOT / "scripts" / "results" / "diag_w4a4_sources.json"))
    return p.parse_args(argv)


def stage_of(layer: str) -> str:
    parts = layer.split(".")
    return ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from datasets import load_dataset

    import hub_dfq
    from hub_dfq.quant.data import calibration_tensor
    from hub_dfq.quant.modules import act_quantizers, quant_layers

    model = hub_dfq.load_model(args.model)
    x, _ = calibration_tensor(model, args.eval, size=None)
    y = torch.tensor(load_dataset("parquet", data_files=args.eval, split="train")["label"])
    real, scored, labels = x[:args.real], x[args.real:], y[args.real:]
    synthetic, _ = calibration_tensor(model, "bns+p", size=args.images, seed=0,
                                      synth_options={"iters": args.steps, "progress": False})
    reference = logits_of(model.module, scored)

    def score(module) -> dict:
        logits = logits_of(module, scored)
        return {"top1": round(100 * float((logits.argmax(1) == labels).float().mean()), 1),
                "kl": round(kl_from(reference, logits), 4)}

    def quantize(data):
        return hub_dfq.quantize(model, weights=4, activations=4, calibration=data, algorithm=args.algorithm,
                                progress=False, resume=False, settings={"reconstruct": {"iters": args.iters}})

    qs, qr = quantize(synthetic), quantize(real)
    rows = {"float": {"top1": round(100 * float((reference.argmax(1) == labels).float().mean()), 1), "kl": 0.0},
            "synthetic": score(qs), "real": score(qr)}
    layers_s, layers_r = dict(quant_layers(qs.module)), dict(quant_layers(qr.module))
    acts_s, acts_r = dict(act_quantizers(qs.module)), dict(act_quantizers(qr.module))
    kept = {name: copy.deepcopy(m.state_dict()) for name, m in [*layers_s.items(), *acts_s.items()]}

    def mix(real_layers: set[str], real_acts: bool) -> dict:
        """The synthetic model with some of the real model's parts, scored, then put back."""
        for name, layer in layers_s.items():
            layer.load_state_dict(layers_r[name].state_dict() if name in real_layers else kept[name])
        for name, q in acts_s.items():
            q.load_state_dict(acts_r[name].state_dict() if real_acts else kept[name])
        return score(qs)

    rows["synthetic weights, real ranges"] = mix(set(), real_acts=True)
    rows["real weights, synthetic ranges"] = mix(set(layers_s), real_acts=False)
    stages = list(dict.fromkeys(stage_of(name) for name in layers_s))
    upto: set[str] = set()
    for stage in stages:
        own = {name for name in layers_s if stage_of(name) == stage}
        upto |= own
        rows[f"real weights in {stage} only"] = mix(own, real_acts=False)
        rows[f"real weights up to {stage}"] = mix(set(upto), real_acts=False)
    mix(set(), real_acts=False)
    ratios = [float(acts_s[n].scale / acts_r[n].scale) for n, q in acts_s.items() if q.mode == "quant" and q.bits < 8]
    setup = (f"{args.algorithm} W4A4, bns+p {args.images}x{args.steps} vs real images 0:{args.real}, scored on "
             f"{args.real}:{len(x)}")
    out = Path(args.json)
    results = json.loads(out.read_text()) if out.exists() else {}
    results[setup] = {"rows": rows, "act_step_ratio_synthetic_to_real": sorted(round(r, 3) for r in ratios)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"\n{setup}\n\n| model | top-1 | KL |\n|---|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['top1']:.1f} | {row['kl']:.3f} |")
    print(f"\n4-bit activation steps, synthetic / real: median {sorted(ratios)[len(ratios) // 2]:.2f}, "
          f"{min(ratios):.2f}-{max(ratios):.2f}")


if __name__ == "__main__":
    main()
