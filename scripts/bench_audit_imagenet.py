"""Audit at 224 px on a real ImageNet model (issue 13): ranking, intervals, similarity, speed, cold start.

Model: EfficientNet-Lite0 (shared timm folder). Data: the 500 shared ImageNet images, split by a
seeded permutation into a *reference half* (250 images, the population of the coverage check) and
a *held-back half* (the clean candidate and, from the same images, its corruptions).

Parts, in one run and one thread setting:

1. Ranking: an audit of clean held-back images; JPEG (quality 30/15/5), Gaussian blur (sigma
   1/2/4 px at the stored 292 px) and contrast (0.7/0.45/0.2) of the same images; CIFAR-10 test
   images (32 px, upscaled by the model's preprocessing); Gaussian synthetic images
   (``hub_dfq.synthesize(..., "gaussian")``); optionally BNS synthetic images (``--bns N ITERS``).
   Targets: clean first, every family monotone in severity, a wide similarity gap.
2. Throughput: audit vs plain forward on the same images, interleaved, best of ``--repeats``; end
   to end (decode + preprocess + forward) and forward only (pre-decoded tensors).
3. Cold start: wall time of ``hub_dfq.audit`` of all 500 images with default settings from an
   empty cache (``HUB_DFQ_CACHE`` set to a new temporary folder), references included.
4. CI coverage: per-image BN sums of the reference half are measured once; ``--sims`` candidate
   subsets of 50/100/200 images are drawn with replacement (so the half is exactly the population)
   and scored by the audit's own accumulator and interval; coverage of the population value
   (the pooled divergence of the 250 images) at 90% and 95%.

Usage (from the repository root):

    OMP_NUM_THREADS=1 python scripts/bench_audit_imagenet.py --threads 1            # ~8 minutes
    OMP_NUM_THREADS=1 python scripts/bench_audit_imagenet.py --threads 1 --limit 16  # smoke, < 1 minute

Prints a markdown table and writes scripts/results/bench_audit_imagenet.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import datasets
import torch
from PIL import ImageEnhance, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from bench_audit import throughput  # noqa: E402  (the CIFAR audit bench's measure, the same here)

import hub_dfq  # noqa: E402
from hub_dfq.audit.core import _summarise  # noqa: E402
from hub_dfq.audit.moments import MomentAccumulator, per_image_sums  # noqa: E402
from hub_dfq.audit.scores import aggregate, bootstrap_estimate, layer_divergences  # noqa: E402
from hub_dfq.bnstats import bn_layers_with_stats, running_moments  # noqa: E402
from hub_dfq.data import decode_image, iter_batches  # noqa: E402

FEATURES = datasets.Features({"image": datasets.Image()})
JPEG_QUALITY = [30, 15, 5]
BLUR_SIGMA = [1.0, 2.0, 4.0]  # pixels at the stored resolution (shorter side 292)
CONTRAST = [0.7, 0.45, 0.2]


# ---- candidates ----------------------------------------------------------------------------------

def _encode(images, fmt: str = "PNG", quality: int | None = None) -> datasets.Dataset:
    cells = []
    for image in images:
        buf = io.BytesIO()
        if fmt == "JPEG":
            image.save(buf, format="JPEG", quality=quality)
        else:
            image.save(buf, format="PNG", compress_level=1)  # lossless; level 1: fast
        cells.append({"bytes": buf.getvalue(), "path": None})
    return datasets.Dataset.from_dict({"image": cells}, features=FEATURES)


def split_real(path: str, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(reference half, held-back half) of the real images, by a seeded permutation."""
    real = hub_dfq.load_images(path).dataset.cast_column("image", datasets.Image(decode=False))
    order = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed)).tolist()
    half = len(order) // 2
    return real.select(order[:half]), real.select(order[half:])


def corrupt(pil: list, *, jpeg: list[int], blur: list[float], contrast: list[float]) -> dict[str, datasets.Dataset]:
    """The corruption sets, one per family and level (1 = mildest): JPEG quality, Gaussian blur sigma, contrast."""
    out = {}
    for level, q in enumerate(jpeg, 1):
        out[f"jpeg-{level}"] = _encode(pil, "JPEG", q)
    for level, sigma in enumerate(blur, 1):
        out[f"blur-{level}"] = _encode([im.filter(ImageFilter.GaussianBlur(sigma)) for im in pil])
    for level, c in enumerate(contrast, 1):
        out[f"contrast-{level}"] = _encode([ImageEnhance.Contrast(im).enhance(c) for im in pil])
    return out


def build_candidates(held: datasets.Dataset, cifar_path: str, model, n: int, seed: int,
                     bns: tuple[int, int] | None) -> dict[str, datasets.Dataset]:
    clean = held.select(range(min(n, len(held))))
    pil = [decode_image(c).convert("RGB") for c in clean["image"]]
    out: dict[str, datasets.Dataset] = {"clean": clean}
    out.update(corrupt(pil, jpeg=JPEG_QUALITY, blur=BLUR_SIGMA, contrast=CONTRAST))
    cifar = datasets.load_dataset("parquet", data_files={"test": cifar_path})["test"]
    out["cifar10-upscaled"] = cifar.select(range(min(n, len(cifar))))
    out["gaussian-synthetic"] = hub_dfq.synthesize(model, "gaussian", len(clean), seed=seed, progress=False)
    if bns:
        out[f"bns-{bns[0]}x{bns[1]}"] = hub_dfq.synthesize(model, "bns", bns[0], iters=bns[1], batch_size=bns[0],
                                                          seed=seed, progress=False)
    return out


# ---- CI coverage ---------------------------------------------------------------------------------

def image_sums(model, data, batch_size: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[int]]:
    """Per layer ``(N, C)`` float64 sums of x and x**2 per image, and each layer's spatial size."""
    layers = bn_layers_with_stats(model.bn_layers)
    parts: list[list] = [[] for _ in layers]
    sizes = [0] * len(layers)

    def hook(i):
        def fn(_module, args):
            sizes[i] = args[0][0, 0].numel()
            s, q = per_image_sums(args[0])
            parts[i].append((s.double(), q.double()))
        return fn

    handles = [bn.register_forward_pre_hook(hook(i)) for i, (_, bn) in enumerate(layers)]
    try:
        with torch.inference_mode():
            for batch in iter_batches(hub_dfq.load_images(data), model.preprocess, batch_size=batch_size):
                model.module(batch.pixel_values)
    finally:
        for h in handles:
            h.remove()
    return [(torch.cat([p[0] for p in ps]), torch.cat([p[1] for p in ps])) for ps in parts], sizes


def coverage(model, sums, sizes, *, sizes_n: list[int], sims: int, bootstrap: int, seed: int) -> dict:
    """Draw ``sims`` candidates of each size with replacement from the population and score them as the audit does."""
    layers = bn_layers_with_stats(model.bn_layers)
    running = running_moments(layers)
    pop = len(sums[0][0])
    acc = MomentAccumulator(layers, device=torch.device("cpu"), bootstrap=0)
    acc.add(sums, sizes)
    acc.finish()
    population = aggregate(layer_divergences(acc.moments(), running, "kl"))
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in sizes_n:
        hits = {"90": 0, "95": 0}
        widths, estimates, plugins = [], [], []
        for sim in range(sims):
            idx = torch.randint(0, pop, (n,), generator=gen)
            acc = MomentAccumulator(layers, device=torch.device("cpu"), bootstrap=bootstrap, seed=seed * 100003 + sim)
            for start in range(0, n, 64):  # forward-sized chunks, as the audit sees them
                part = idx[start:start + 64]
                acc.add([(s[part], q[part]) for s, q in sums], sizes)
            acc.finish()
            result = _summarise("sim", acc, running, metric="kl", skipped=[], n_skipped=0)
            lo, hi = result.ci
            hits["95"] += lo <= population <= hi
            b90 = bootstrap_estimate(acc.bootstrap_moments(), running, "kl", plugin_layers=list(result.layers.values()),
                                     level=0.90)
            hits["90"] += b90.ci[0] <= population <= b90.ci[1]
            widths.append(hi / lo)
            estimates.append(result.divergence)
            plugins.append(result.divergence_plugin)
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        rows.append({"n": n, "sims": sims, "coverage_90": hits["90"] / sims, "coverage_95": hits["95"] / sims,
                     "mean_estimate": mean(estimates), "mean_plugin": mean(plugins),
                     "median_ratio_hi_lo_95": sorted(widths)[len(widths) // 2]})
    return {"population_images": pop, "population_divergence": population, "rows": rows}


# ---- main ----------------------------------------------------------------------------------------

def monotone(report, family: str) -> bool:
    values = [report["clean"].divergence] + [report[f"{family}-{k}"].divergence for k in (1, 2, 3)]
    return all(a < b for a, b in zip(values, values[1:]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=f"local-dir:{SHARED / 'models' / 'imagenet-efficientnet-lite0'}")
    parser.add_argument("--real", default=str(SHARED / "data" / "imagenet-sample" / "even-classes.parquet"))
    parser.add_argument("--cifar", default=str(SHARED / "data" / "cifar10" / "test.parquet"))
    parser.add_argument("--n", type=int, default=200, help="images per candidate (default 200)")
    parser.add_argument("--limit", type=int, help="smoke run: at most this many images per candidate, throughput "
                        "and cold audit, coverage sizes and simulations scaled down")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="throughput repeats (best is kept)")
    parser.add_argument("--sims", type=int, default=200, help="coverage simulations per candidate size")
    parser.add_argument("--bns", type=int, nargs=2, metavar=("IMAGES", "ITERS"), help="add a BNS synthetic candidate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=str(ROOT / "scripts" / "results" / "bench_audit_imagenet.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = " ".join(["python scripts/bench_audit_imagenet.py", *(sys.argv[1:] if argv is None else argv)])
    n = min(args.n, args.limit) if args.limit else args.n
    sims = min(args.sims, 10) if args.limit else args.sims
    sizes_n = [min(16, args.limit)] if args.limit else [50, 100, 200]
    cold_n = min(500, args.limit or 500)
    timings: dict[str, float] = {}

    # Cold start first, in a process whose caches are empty: the wall time a user sees for 500 images.
    with tempfile.TemporaryDirectory() as cache:
        os.environ["HUB_DFQ_CACHE"] = cache
        start = time.perf_counter()
        model = hub_dfq.load_model(args.model)
        cold = hub_dfq.audit(model, {"real-500": hub_dfq.load_images(args.real, limit=cold_n)}, progress=False)
        timings["cold_audit_500_s"] = time.perf_counter() - start
        cold_near = cold.references.get("near") or {}
        t0 = time.perf_counter()
        reference, held = split_real(args.real, args.seed)
        candidates = build_candidates(held, args.cifar, model, n, args.seed, tuple(args.bns) if args.bns else None)
        timings["build_candidates_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = hub_dfq.audit(model, candidates, batch_size=args.batch_size, progress=False)
        timings["ranking_audit_s"] = time.perf_counter() - t0
    speed = throughput(model, hub_dfq.load_images(candidates["clean"]), batch_size=args.batch_size,
                       repeats=args.repeats)
    t0 = time.perf_counter()
    sums, sizes = image_sums(model, reference, args.batch_size)
    cov = coverage(model, sums, sizes, sizes_n=sizes_n, sims=sims, bootstrap=report.settings["bootstrap"],
                   seed=args.seed)
    timings["coverage_s"] = time.perf_counter() - t0

    ranking = [c.dataset for c in report.ranking()]
    far = report.references["far"]
    families = {f: monotone(report, f) for f in ("jpeg", "blur", "contrast")}
    sim = {c.dataset: c.similarity for c in report.candidates}
    targets = {
        "clean_ranks_first": ranking[0] == "clean",
        "families_monotone": families,
        "similarity_gap_clean_vs_blur3": sim["clean"] - sim["blur-3"],
        "similarity_gap_clean_vs_cifar": sim["clean"] - sim["cifar10-upscaled"],
        "ci_contains_estimate": all(c.ci[0] <= c.divergence <= c.ci[1] for c in report.candidates),
        "ci_lower_above_zero": all(c.ci[0] > 0 for c in report.candidates),
        "throughput_ratio_e2e": speed["ratio_e2e"],
        "throughput_ratio_fwd": speed["ratio_fwd"],
        "cold_audit_500_s": timings["cold_audit_500_s"],
    }
    result = {
        "command": command, "model": args.model, "images_per_candidate": n, "threads": torch.get_num_threads(),
        "batch_size": args.batch_size, "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "timings_s": timings, "throughput": speed, "targets": targets,
        "references": {"far": {k: far.get(k) for k in ("method", "n_images", "divergence", "ci")},
                       "near": {k: (report.references.get("near") or {}).get(k)
                                for k in ("method", "skipped", "error", "cost_gmacs", "divergence")}},
        "normalisation": report.settings["normalisation"], "cold_audit_near": cold_near.get("error"),
        "ranking": [{"rank": c.rank, "dataset": c.dataset, "n_images": c.n_images, "divergence": c.divergence,
                     "divergence_plugin": c.divergence_plugin, "ci": list(c.ci) if c.ci else None,
                     "similarity": c.similarity, "similarity_ci": list(c.similarity_ci) if c.similarity_ci else None}
                    for c in report.ranking()],
        "coverage": cov,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))

    print(f"Command: `OMP_NUM_THREADS={args.threads} {command}`\n")
    print(f"Model `{args.model}`, {n} images per candidate, batches of {args.batch_size}, torch threads "
          f"{torch.get_num_threads()}. Similarity: {report.settings['normalisation']}; far (Gaussian noise, "
          f"{far.get('n_images')} images) = {far['divergence']:.4g}.\n")
    print("| rank | candidate | images | divergence (KL, bias-corrected) | 95% CI | plug-in | similarity |")
    print("|---:|---|---:|---:|---|---:|---:|")
    for row in result["ranking"]:
        ci = f"[{row['ci'][0]:.4g}, {row['ci'][1]:.4g}]" if row["ci"] else "–"
        print(f"| {row['rank']} | {row['dataset']} | {row['n_images']} | {row['divergence']:.4g} | {ci} | "
              f"{row['divergence_plugin']:.4g} | {row['similarity']:.3f} |")
    print(f"\nClean first: {targets['clean_ranks_first']}; monotone: {families}; similarity gap clean - blur-3 "
          f"{targets['similarity_gap_clean_vs_blur3']:.3f}, "
          f"clean - CIFAR-10 {targets['similarity_gap_clean_vs_cifar']:.3f}.\n")
    print("| throughput (img/s) | plain | audit | audit / plain |\n|---|---:|---:|---:|")
    print(f"| end to end (decode + preprocess + forward) | {speed['plain_e2e']:.1f} | {speed['audit_e2e']:.1f} | "
          f"{speed['ratio_e2e']:.2f} |")
    print(f"| forward only (pre-decoded tensors) | {speed['plain_fwd']:.1f} | {speed['audit_fwd']:.1f} | "
          f"{speed['ratio_fwd']:.2f} |\n")
    print(f"Cold audit of {cold_n} real images (empty cache, default settings, references included): "
          f"{timings['cold_audit_500_s']:.1f} s (near reference: {cold_near.get('error') or 'measured'}).\n")
    print(f"CI coverage: population = reference half ({cov['population_images']} images, pooled KL "
          f"{cov['population_divergence']:.4g}); candidates drawn with replacement, {sims} per size.\n")
    print("| images | coverage 90% | coverage 95% | mean estimate | mean plug-in | median hi/lo (95%) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in cov["rows"]:
        print(f"| {row['n']} | {row['coverage_90']:.3f} | {row['coverage_95']:.3f} | {row['mean_estimate']:.4g} | "
              f"{row['mean_plugin']:.4g} | {row['median_ratio_hi_lo_95']:.2f} |")
    print("\nTimings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
