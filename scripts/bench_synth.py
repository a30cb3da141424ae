"""Benchmark the BNS generator against a straightforward loop, side by side in one run.

(a) milliseconds per image-iteration of hub-dfq's loop and of a straightforward one (Adam on the
    input, forward hooks keeping the BN inputs, weights not frozen, fp32, ``torch.var_mean``), at
    the same batch and iteration count, with the final divergence of each; plus the machine's floor
    (forward + input-backward FLOPs over the measured 2048x2048 matmul rate of each precision).
(b) time to quality: wall time until hub-dfq's generator reaches the divergence the straightforward
    loop has after 500 iterations (searching the smallest iteration budget on a ladder).

Divergence = the BN-KL loss (channel-mean KL per layer, summed over layers) of one batch; hub-dfq's
is measured on the stored uint8 images, the straightforward loop's on its final float inputs.

Usage (the lead's quiet-machine run)::

    python scripts/bench_synth.py --threads 2                     # full table
    python scripts/bench_synth.py --threads 1 --quick             # smoke test (seconds)
    python scripts/bench_synth.py --models lite0 --batches 32 --iters 20 --skip-quality   # 224 px

Writes a markdown table to stdout and JSON to scripts/results/bench_synth.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"resnet20": "local-dir:../shared/models/cifar10-resnet20", "resnet44": "local-dir:../shared/models/cifar10-resnet44",
          "lite0": "local-dir:../shared/models/imagenet-efficientnet-lite0"}


MEDIAN_STEP: dict[str, float] = {}


def median_step(stamps: list[float]) -> float:
    """Median seconds between consecutive iterations: robust to other processes stealing the CPU."""
    gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    return gaps[len(gaps) // 2] if gaps else math.nan


def matmul_rate(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Measured GFLOP/s of a size x size matmul."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    for _ in range(2):
        a @ b
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


def image_iteration_flops(module: torch.nn.Module, input_size) -> float:
    """FLOPs of one image-iteration: forward + backward to the input (2x forward for convs/linears,
    minus the first layer's input gradient which is still needed, so simply 2x forward)."""
    flops = 0

    def hook(mod, args, out):
        nonlocal flops
        if isinstance(mod, torch.nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            flops += 2 * out.numel() * k
        elif isinstance(mod, torch.nn.Linear):
            flops += 2 * out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        module(torch.zeros(1, *input_size))
    for h in handles:
        h.remove()
    return 2.0 * flops


def convs_alone_ms(module: torch.nn.Module, input_size, batch: int, precision: str, iters: int = 20) -> float:
    """Milliseconds per image of just the model's convolutions and linears, forward + input backward, in
    the loop's precision and memory format: what the kernels cost before any other op of the loop."""
    import copy
    from contextlib import nullcontext

    module = copy.deepcopy(module).eval().requires_grad_(False).to(memory_format=torch.channels_last)
    layers: list[tuple[torch.nn.Module, torch.Size]] = []

    def hook(mod, args, out):
        layers.append((mod, args[0].shape))

    kinds = (torch.nn.Conv2d, torch.nn.Linear)
    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, kinds)]
    with torch.no_grad():
        module(torch.zeros(batch, *input_size).contiguous(memory_format=torch.channels_last))
    for h in handles:
        h.remove()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    total = 0.0
    for layer, shape in layers:
        x = torch.randn(shape)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        times = []
        for _ in range(iters + 3):
            t = time.perf_counter()
            with autocast:
                y = layer(x)
            torch.autograd.grad(y, x, torch.ones_like(y))
            times.append(time.perf_counter() - t)
        total += sorted(times[3:])[len(times[3:]) // 2]
    return total * 1e3 / batch


def model_step_ms(model, batch: int, precision: str, iters: int = 10, heap: bool = True) -> float:
    """Milliseconds per image of the model's own forward + backward to the input, nothing else: same
    resolution, precision (weights of plain convs/linears in bf16 under autocast, as the loop holds them) and
    channels-last layout, and (``heap``) the loop's allocator setting. The bound the loop is measured against."""
    import copy
    from contextlib import nullcontext

    from hub_dfq.allocator import heap_reuse
    from hub_dfq.models.vision_model import WEIGHT_LAYER_TYPES

    module = copy.deepcopy(model.module).eval().requires_grad_(False).to(memory_format=torch.channels_last)
    if precision == "bf16":
        plain = tuple(layer.forward for layer in WEIGHT_LAYER_TYPES)
        for sub in module.modules():
            if type(sub).forward in plain:
                sub.to(torch.bfloat16)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    x = torch.randn(batch, *model.input_size).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    stamps = []
    with heap_reuse(heap):
        for _ in range(iters + 2):
            with autocast:
                out = module(x)
            out.float().sum().backward()
            x.grad = None
            stamps.append(time.perf_counter())
    return median_step(stamps[1:]) * 1e3 / batch


def straightforward(model, batch: int, iters: int, lr: float, seed: int) -> tuple[float, float, float]:
    """The textbook loop. Returns (seconds, final divergence of its float inputs, of them stored as uint8)."""
    import copy

    from hub_dfq.bnstats import gaussian_kl

    module = copy.deepcopy(model.module).eval()  # weights stay requires_grad=True: weight grads computed
    bns = [m for _, m in model.bn_layers]
    names = [n for n, _ in model.bn_layers]
    by_name = dict(module.named_modules())
    bns = [by_name[n] for n in names]
    inputs: list[torch.Tensor] = [None] * len(bns)  # type: ignore[list-item]
    handles = [bn.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0])) for i, bn in enumerate(bns)]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *model.input_size, generator=gen).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)

    def divergence():
        total = 0.0
        for bn, a in zip(bns, inputs):
            var, mean = torch.var_mean(a, dim=(0, 2, 3), correction=0)
            total = total + gaussian_kl(bn.running_mean, bn.running_var, mean, var).mean()
        return total

    t = time.perf_counter()
    stamps = [t]
    for _ in range(iters):
        opt.zero_grad()
        module(x)
        loss = divergence()
        loss.backward()
        opt.step()
        stamps.append(time.perf_counter())
    seconds = time.perf_counter() - t
    MEDIAN_STEP["last"] = median_step(stamps)
    with torch.no_grad():
        module(x)
        final = float(divergence())
        # the same images as they would be published: clipped to real pixels and rounded to uint8
        pixels = model.preprocess.denormalize(x).clamp(0, 1).mul(255).round().div(255)
        module(model.preprocess.normalize(pixels))
        stored = float(divergence())
    for h in handles:
        h.remove()
    return seconds, final, stored


def ours(model, batch: int, iters: int, seed: int, precision: str, lr: float | None = None) -> tuple[float, float]:
    """hub-dfq's BatchGenerator (optimisation only, no writing). Returns (seconds, final divergence)."""
    from hub_dfq.synth.config import SynthConfig
    from hub_dfq.synth.generator import BatchGenerator

    cfg = SynthConfig(method="bns", num_images=batch, batch_size=batch, iters=iters, lr=lr, seed=seed, precision=precision)
    gen = BatchGenerator(model, cfg)
    t = time.perf_counter()
    stamps: list[float] = []
    result = gen.generate(torch.zeros(batch, dtype=torch.long), torch.Generator().manual_seed(seed),
                          on_step=lambda step, loss: stamps.append(time.perf_counter()))
    seconds = time.perf_counter() - t
    MEDIAN_STEP["last"] = median_step(stamps)
    return seconds, sum(result.end.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--iters", type=int, default=200, help="iterations for the per-iteration timing (a)")
    parser.add_argument("--reference-iters", type=int, default=500, help="straightforward iterations for (b)")
    parser.add_argument("--baseline-lr", type=float, default=0.1)
    parser.add_argument("--ladder", nargs="+", type=int, default=[100, 150, 200, 300, 500],
                        help="iteration budgets of hub-dfq tried in (b), smallest first")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the script runs")
    parser.add_argument("--skip-quality", action="store_true", help="only (a)")
    parser.add_argument("--out", default=str(ROOT / "scripts" / "results" / "bench_synth.json"))
    args = parser.parse_args()
    if args.quick:
        args.models, args.batches, args.iters, args.reference_iters = ["resnet20"], [8], 5, 20
        args.ladder = [5, 10, 20]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sys.path.insert(0, str(ROOT))
    import os

    os.chdir(ROOT)
    from hub_dfq import load_model
    from hub_dfq.synth.config import SynthConfig

    precision = SynthConfig(method="bns", num_images=1, precision=args.precision).precision
    rates = {"fp32": matmul_rate(torch.float32), "bf16": matmul_rate(torch.bfloat16)}
    rows, quality = [], []
    for name in args.models:
        model = load_model(MODELS[name])
        flops = image_iteration_flops(model.module, model.input_size)
        floor_ms = {p: flops / (rates[p] * 1e9) * 1e3 for p in rates}
        for batch in args.batches:
            _, base_div, _ = straightforward(model, batch, args.iters, args.baseline_lr, seed=0)
            base_ms = MEDIAN_STEP["last"] * 1e3 / batch
            _, our_div = ours(model, batch, args.iters, seed=0, precision=precision)
            our_ms = MEDIAN_STEP["last"] * 1e3 / batch
            kernels_ms = convs_alone_ms(model.module, model.input_size, batch, precision)
            step_ms = model_step_ms(model, batch, precision)
            step_plain_ms = model_step_ms(model, batch, precision, heap=False)
            rows.append({"model": name, "batch": batch, "iters": args.iters, "gflop_per_image_iter": flops / 1e9,
                         "floor_ms_fp32": floor_ms["fp32"], "floor_ms_bf16": floor_ms["bf16"],
                         "convs_alone_ms": kernels_ms, "convs_alone_vs_floor": kernels_ms / floor_ms[precision],
                         "straightforward_ms": base_ms, "straightforward_div": base_div,
                         "ours_ms": our_ms, "ours_div": our_div, "ours_precision": precision,
                         "ours_vs_floor": our_ms / floor_ms[precision], "speedup": base_ms / our_ms,
                         "model_step_ms": step_ms, "model_step_plain_allocator_ms": step_plain_ms,
                         "ours_vs_model_step": our_ms / step_ms})
            print(f"# {name} b{batch}: straightforward {base_ms:.3f} ms ({base_div:.4f}), ours {our_ms:.3f} ms "
                  f"({our_div:.4f})", file=sys.stderr, flush=True)
            if args.skip_quality:
                continue
            ref_s, ref_div, ref_stored = straightforward(model, batch, args.reference_iters, args.baseline_lr, seed=0)
            reached = None
            for iters in args.ladder:
                seconds, div = ours(model, batch, iters, seed=0, precision=precision)
                print(f"#   ours {iters} iters: {div:.4f} in {seconds:.1f}s (target {ref_div:.4f})", file=sys.stderr,
                      flush=True)
                if div <= ref_div:
                    reached = {"iters": iters, "seconds": seconds, "div": div}
                    break
            quality.append({"model": name, "batch": batch, "reference_iters": args.reference_iters,
                            "reference_seconds": ref_s, "reference_div": ref_div,
                            "reference_div_stored_uint8": ref_stored,
                            "ours": reached, "speedup": (ref_s / reached["seconds"]) if reached else None})
    command = "python " + " ".join(sys.argv)
    print(f"Command: `{command}`  (torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()})\n")
    print(f"Matmul 2048x2048: fp32 {rates['fp32']:.0f} GFLOP/s, bf16 {rates['bf16']:.0f} GFLOP/s\n")
    print("(a) per image-iteration (ms, median over the iterations), same batch and iterations; divergence = BN-KL "
          "of the batch after them\n")
    print("'convs alone' = the model's conv/linear kernels only (forward + input backward, same precision and "
          "layout), the part of the floor no loop can beat with these kernels.\n")
    print("'model step' = the model's own forward + backward to the input, nothing else (same precision, layout and "
          "allocator setting as ours; 'plain alloc.': glibc's defaults): the target is ours <= 1.3x it.\n")
    print("| model | batch | GFLOP/img-it | floor fp32 | floor bf16 | convs alone | model step | model step, plain alloc. "
          "| straightforward | ours | ours/model step | ours/floor | speedup | div straightforward | div ours |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['gflop_per_image_iter']:.3f} | {r['floor_ms_fp32']:.3f} | "
              f"{r['floor_ms_bf16']:.3f} | {r['convs_alone_ms']:.3f} | {r['model_step_ms']:.3f} | "
              f"{r['model_step_plain_allocator_ms']:.3f} | {r['straightforward_ms']:.3f} | "
              f"{r['ours_ms']:.3f} ({r['ours_precision']}) | {r['ours_vs_model_step']:.2f}x | {r['ours_vs_floor']:.2f}x | "
              f"{r['speedup']:.2f}x | {r['straightforward_div']:.4f} | {r['ours_div']:.4f} |")
    if quality:
        print(f"\n(b) time to the divergence the straightforward loop has after {args.reference_iters} iterations\n")
        print("Target = the straightforward loop's divergence on its float inputs (stored as uint8 PNGs they would "
              "score the 'stored' column); ours is always measured on the stored uint8 images.\n")
        print("| model | batch | straightforward (s) | target div | its div stored | ours iters | ours (s) | ours div "
              "| speedup |")
        print("|---|---|---|---|---|---|---|---|---|")
        for q in quality:
            o = q["ours"]
            if o:
                print(f"| {q['model']} | {q['batch']} | {q['reference_seconds']:.1f} | {q['reference_div']:.4f} | "
                      f"{q['reference_div_stored_uint8']:.4f} | {o['iters']} | {o['seconds']:.1f} | {o['div']:.4f} | {q['speedup']:.1f}x |")
            else:
                print(f"| {q['model']} | {q['batch']} | {q['reference_seconds']:.1f} | {q['reference_div']:.4f} | "
                      f"{q['reference_div_stored_uint8']:.4f} | not reached on {args.ladder} | - | - | - |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "threads": args.threads, "torch": torch.__version__,
                               "matmul_gflops": rates, "per_iteration": rows, "time_to_quality": quality},
                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
