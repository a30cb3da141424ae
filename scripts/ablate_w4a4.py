#!/usr/bin/env python
"""Where W4A4 loses its points on an EfficientNet-Lite, and which settings move it (issue #18).

Every row quantizes the model at 4-bit weights on the same synthetic calibration set (`--method`, `bns+p` by
default, N images x STEPS synthesis steps, seed S) and reports top-1 on the evaluation images (paired with
float), agreement with float, the KL divergence from float there, and the KL from float on a *held-out*
synthetic set (the same method, seed S + 1): a data-free criterion, so a setting can be chosen without looking
at real images. A row is
`ALGORITHM[:key=value,...]`:

    gptq:a4=all            GPTQ at W4A4 (no reconstruction)
    gptq:a4=dw             GPTQ at W4A8 with 4-bit inputs on the depthwise convs only (also pw, pwl, head, none)
    gptq:obs=percentile    activation ranges from another observer (default mse)
    reconstruct            W4A4 reconstruction, 75 fitting steps per block (iters=, lr_act=, lr_round=, lr_bias=,
                           ...: any setting of the algorithm, as `hub-dfq quantize --setting` takes them)
    distill:init=reconstruct,iters=100
                           the same reconstruction, then distillation of the whole model on the same images;
                           `reconstruct.NAME=VALUE` sets the reconstruction it starts from
    gptq:a4=all,eq=0.5     an ablation not in the product: before quantizing, scale each ReLU6 output channel
                           feeding a depthwise conv by (max_c' r_c' / r_c)^0.5 (r_c: the channel's largest value
                           on the calibration images) and divide the depthwise kernel by the same factor
                           (DFQ-style range equalisation; the ReLU6 stays, so the float model is not exact:
                           the row reports how far its logits moved)

    python scripts/ablate_w4a4.py --rows gptq:a4=none gptq:a4=all gptq:a4=dw gptq:a4=pwl gptq:a4=pw \
        gptq:a4=head gptq:obs=percentile reconstruct reconstruct:lr_act=0.004 reconstruct:lr_act=0.00025 \
        reconstruct:lr_round=0.03 reconstruct:lr_bias=0.001 reconstruct:lr_bias=0.003 reconstruct:drop_prob=0.25 \
        reconstruct:drop_prob=0.75 distill:init=reconstruct,iters=100,batch_size=32 gptq:a4=all,eq=1 \
        gptq:a4=all,eq=0.5

Finished rows are kept in the JSON and skipped on a re-run. Module names follow timm's EfficientNet blocks
(`conv_pw` expansion, `conv_dw` depthwise, `conv_pwl` projection).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
# Which convs read 4-bit inputs at W4A8 for a "gptq:a4=GROUP" row ("all": the whole model at A4).
GROUPS = {"none": {}, "dw": {"blocks.*.conv_dw": {"activations": 4}},
          "pwl": {"blocks.*.conv_pwl": {"activations": 4}, "blocks.0.0.conv_pw": {"activations": 4}},
          "pw": {"blocks.[1-9].*.conv_pw": {"activations": 4}}, "head": {"conv_head": {"activations": 4}}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=f"local-dir:{SHARED / 'models' / 'imagenet-efficientnet-lite0'}")
    p.add_argument("--eval", default=str(SHARED / "data" / "imagenet-sample" / "even-classes.parquet"),
                   help="a parquet file with `image` and `label` columns")
    p.add_argument("--rows", nargs="+", default=["gptq:a4=all", "reconstruct"])
    p.add_argument("--method", default="bns+p", help="synthesis method of the calibration and held-out images")
    p.add_argument("--images", type=int, default=64, help="synthetic calibration images")
    p.add_argument("--steps", type=int, default=100, help="synthesis steps per image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=str(ROOT / "scripts" / "results" / "ablate_w4a4.json"))
    return p.parse_args(argv)


@torch.no_grad()
def logits_of(module, x: torch.Tensor, batch: int = 50) -> torch.Tensor:
    return torch.cat([module(x[i:i + batch]) for i in range(0, len(x), batch)])


def kl_from(reference: torch.Tensor, logits: torch.Tensor) -> float:
    p = reference.log_softmax(1)
    return float((p.exp() * (p - logits.log_softmax(1))).sum(1).mean())


@torch.no_grad()
def equalise_depthwise_inputs(module: torch.nn.Module, calibration: torch.Tensor, alpha: float) -> None:
    """Scale every ReLU6 output channel that feeds a depthwise conv up towards the tensor's largest channel."""
    pairs = [(module.bn1, module.blocks[0][0].conv_dw)]
    pairs += [(b.bn1, b.conv_dw) for stage in module.blocks for b in stage if hasattr(b, "conv_pwl")]
    largest = {}

    def keep_max(key, output):
        largest[key] = torch.maximum(largest.get(key, torch.zeros(output.shape[1])), output.amax((0, 2, 3)))

    hooks = [bn.register_forward_hook(lambda _m, _i, out, key=i: keep_max(key, out)) for i, (bn, _) in enumerate(pairs)]
    logits_of(module, calibration, 32)
    for hook in hooks:
        hook.remove()
    for i, (bn, conv) in enumerate(pairs):
        r = largest[i].clamp(1e-3, 6.0)
        t = ((r.max() / r) ** alpha).clamp(max=32.0)
        bn.weight.mul_(t)
        bn.bias.mul_(t)
        conv.weight.div_(t.view(-1, 1, 1, 1))


def run_row(spec: str, model, calibration, held, real_x, real_y, float_real, float_held) -> dict:
    import hub_dfq
    from hub_dfq.cli.quantize import setting_value

    algorithm, _, rest = spec.partition(":")
    options = dict(part.split("=") for part in rest.split(",") if part)
    group = options.pop("a4", "all")
    alpha = float(options.pop("eq", 0))
    observer = options.pop("obs", "mse")
    if group != "all" and group not in GROUPS:
        raise SystemExit(f"row {spec!r}: a4 must be one of all, {', '.join(GROUPS)}")
    # the rest are settings of the row's algorithm, or of another one it runs first when prefixed with its name
    # (`distill:init=reconstruct,reconstruct.iters=150`): hub_dfq.quantize names any it does not know
    settings: dict[str, dict] = {}
    for key, value in options.items():
        owner, _, name = key.rpartition(".")
        settings.setdefault(owner or algorithm, {})[name] = setting_value(value)
    settings.setdefault("reconstruct", {}).setdefault("iters", 75)
    vm = model
    moved = 0.0
    if alpha:
        vm = copy.deepcopy(model)
        equalise_depthwise_inputs(vm.module, calibration, alpha)
        moved = float((logits_of(vm.module, real_x[:50]) - float_real[:50]).abs().max())
    start = time.perf_counter()
    q = hub_dfq.quantize(vm, weights=4, activations=4 if group == "all" else 8, calibration=calibration,
                         algorithm=algorithm, overrides=GROUPS.get(group) or None, act_observer=observer,
                         progress=False, resume=False,
                         settings=settings)
    seconds = time.perf_counter() - start
    logits, held_logits = logits_of(q, real_x), logits_of(q, held)
    top1 = 100 * float((logits.argmax(1) == real_y).float().mean())
    return {"row": spec, "top1": round(top1, 2),
            "drop": round(top1 - 100 * float((float_real.argmax(1) == real_y).float().mean()), 2),
            "agreement": round(100 * float((logits.argmax(1) == float_real.argmax(1)).float().mean()), 2),
            "kl": round(kl_from(float_real, logits), 4),
            "kl_heldout_synthetic": round(kl_from(float_held, held_logits), 4),
            "float_logits_moved": round(moved, 4), "seconds": round(seconds, 1)}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from datasets import load_dataset

    import hub_dfq
    from hub_dfq.quant.data import calibration_tensor

    out = Path(args.json)
    results = json.loads(out.read_text()) if out.exists() else {}
    model = hub_dfq.load_model(args.model)
    real_x, _ = calibration_tensor(model, args.eval, size=None)
    real_y = torch.tensor(load_dataset("parquet", data_files=args.eval, split="train")["label"])
    synth = {"iters": args.steps, "progress": False}
    calibration, _ = calibration_tensor(model, args.method, size=args.images, seed=args.seed, synth_options=synth)
    held, _ = calibration_tensor(model, args.method, size=args.images, seed=args.seed + 1, synth_options=synth)
    float_real, float_held = logits_of(model.module, real_x), logits_of(model.module, held)
    setup = f"{args.model}|{args.eval}|{args.method} {args.images}x{args.steps} seed {args.seed}"
    for spec in args.rows:
        key = f"{setup}|{spec}"
        if key not in results:
            results[key] = run_row(spec, model, calibration, held, real_x, real_y, float_real, float_held)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        print(json.dumps(results[key]), flush=True)
    rows = [results[f"{setup}|{spec}"] for spec in args.rows]
    print(f"\n{setup}\n\n| row | top-1 | drop | agreement | KL (eval) | KL (held-out synthetic) | float moved | s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| `{r['row']}` | {r['top1']:.1f} | {r['drop']:+.1f} | {r['agreement']:.1f} | {r['kl']:.3f} | "
              f"{r['kl_heldout_synthetic']:.3f} | {r['float_logits_moved']:.2f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
