"""Per-image out-of-distribution detection (issue 21): the BN score vs MSP vs energy, side by side.

For every image of every set, one forward pass gives all detectors (none needs training data):

* **BN score** (``hub_dfq.score_images``): per BN layer, the channel mean of ``reverse_kl`` between the
  image's own spatial moments at the layer's input and the running statistics; geometric mean over
  layers. ``kl`` and ``w2`` (the same sums, another divergence) are reported beside it.
* **MSP** (Hendrycks & Gimpel 2017): ``-max softmax``; **energy** (Liu et al. 2020): ``-logsumexp(logits)``.

Higher = more out-of-distribution for all. Per set: AUROC of in-distribution (negatives) vs the set
(positives), and FPR at 95% TPR (the share of the set accepted by the threshold that accepts 95% of
the in-distribution images).

Models and sets:

* EfficientNet-Lite0 (../shared, 224 px). In-distribution: the *held-back* half of the 500 shared
  ImageNet images (seeded split, as ``bench_audit_imagenet.py``). Sets: CIFAR-10 test images (32 px,
  upscaled by the model's preprocessing), Gaussian noise images (``hub_dfq.synthesize(.., "gaussian")``),
  and JPEG (quality 40/20/10/5), Gaussian blur (sigma 1/2/3/4 px at the stored 292 px) and contrast
  (0.7/0.5/0.3/0.15) of the in-distribution images.
* CIFAR-10 ResNet-20 and -44 (../shared). In-distribution: CIFAR-10 test images. Sets: pixel noise
  (sigma 0.04/0.08/0.12/0.2), JPEG (40/20/10/5), blur (sigma 0.5/0.75/1/1.5 px), contrast (as above),
  Gaussian noise images, and ImageNet images (the shared sample, downscaled to 32 px: another domain).

Also measured: the false-positive rate of a ``fpr=0.05`` threshold on the in-distribution images,
calibrated on BNS synthetic images (no real data) and on a disjoint real sample (the ImageNet
reference half; CIFAR-10 train images); and throughput of ``score_images`` vs a plain forward pass
(decode + preprocess + forward, best of ``--repeats``, interleaved).

Usage (from the repository root)::

    OMP_NUM_THREADS=1 python scripts/bench_ood.py --threads 1                         # see scripts/README.md
    OMP_NUM_THREADS=1 python scripts/bench_ood.py --threads 1 --lite0-n 8 --cifar-n 32 --lite0-bns 4 8  # smoke
    OMP_NUM_THREADS=2 python scripts/bench_ood.py --threads 2 --scale 1000 --out scripts/results/bench_ood_scale.json

Prints markdown tables and writes scripts/results/bench_ood.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from bench_audit_imagenet import _encode, corrupt, split_real  # noqa: E402  (the audit bench's sets, the same split)

import hub_dfq  # noqa: E402
from hub_dfq.audit.images import calibrate_threshold, score_images  # noqa: E402
from hub_dfq.audit.moments import image_layer_divergences, per_image_sums  # noqa: E402
from hub_dfq.audit.registry import divergence_fn  # noqa: E402
from hub_dfq.audit.scores import aggregate_layers, auroc  # noqa: E402
from hub_dfq.bnstats import bn_layers_with_stats, running_moments  # noqa: E402
from hub_dfq.data import decode_image, iter_batches  # noqa: E402

BN_METRICS = ("reverse_kl", "kl", "w2")
DETECTORS = ("bn", "msp", "energy")
JPEG_QUALITY = [40, 20, 10, 5]
CONTRAST = [0.7, 0.5, 0.3, 0.15]
BLUR_IMAGENET = [1.0, 2.0, 3.0, 4.0]
BLUR_CIFAR = [0.5, 0.75, 1.0, 1.5]
PIXEL_NOISE = [0.04, 0.08, 0.12, 0.2]


# ---- sets ---------------------------------------------------------------------------------------

def _pil(ds: datasets.Dataset, column: str) -> list[Image.Image]:
    return [decode_image(c).convert("RGB") for c in ds.cast_column(column, datasets.Image(decode=False))[column]]


def corruptions(pil: list[Image.Image], blur: list[float], seed: int) -> dict[str, datasets.Dataset]:
    return corrupt(pil, jpeg=JPEG_QUALITY, blur=blur, contrast=CONTRAST)


def pixel_noise(pil: list[Image.Image], seed: int) -> dict[str, datasets.Dataset]:
    rng = np.random.default_rng(seed)
    out = {}
    for level, sigma in enumerate(PIXEL_NOISE, 1):
        noisy = []
        for im in pil:
            x = np.asarray(im, dtype=np.float64) / 255.0
            x = np.clip(x + rng.normal(0.0, sigma, x.shape), 0.0, 1.0)
            noisy.append(Image.fromarray((x * 255).round().astype(np.uint8)))
        out[f"noise-{level}"] = _encode(noisy)
    return out


def imagenet_sets(model, n: int, seed: int) -> tuple[datasets.Dataset, datasets.Dataset, dict]:
    """(in-distribution held-back images, reference half for calibration, shifted sets)."""
    reference, held = split_real(str(SHARED / "data/imagenet-sample/even-classes.parquet"), seed)
    clean = held.select(range(min(n, len(held))))
    sets = corruptions(_pil(clean, "image"), BLUR_IMAGENET, seed)
    cifar = datasets.load_dataset("parquet", data_files={"test": str(SHARED / "data/cifar10/test.parquet")})["test"]
    sets["cifar10-upscaled"] = cifar.select(range(min(n, len(cifar))))
    sets["gaussian-noise"] = hub_dfq.synthesize(model, "gaussian", len(clean), seed=seed, progress=False)
    return clean, reference, sets


def cifar_sets(model, n: int, seed: int) -> tuple[datasets.Dataset, datasets.Dataset, dict]:
    test = datasets.load_dataset("parquet", data_files={"test": str(SHARED / "data/cifar10/test.parquet")})["test"]
    train = datasets.load_dataset("parquet", data_files={"train": str(SHARED / "data/cifar10/train.parquet")})["train"]
    clean = test.select(range(min(n, len(test))))
    pil = _pil(clean, "img")
    sets = {**pixel_noise(pil, seed), **corruptions(pil, BLUR_CIFAR, seed)}
    sets["gaussian-noise"] = hub_dfq.synthesize(model, "gaussian", len(clean), seed=seed, progress=False)
    imagenet = hub_dfq.load_images(str(SHARED / "data/imagenet-sample/even-classes.parquet")).dataset
    small = [im.resize((32, 32), Image.BILINEAR) for im in _pil(imagenet.select(range(min(n, len(imagenet)))),
                                                                 "image")]
    sets["imagenet-32px"] = _encode(small)
    return clean, train.select(range(min(1000, len(train)))), sets


# ---- detectors ----------------------------------------------------------------------------------

@torch.inference_mode()
def detect(model, data, batch_size: int) -> dict[str, np.ndarray]:
    """Every detector's score of every readable image of ``data`` (one forward pass per batch)."""
    layers = bn_layers_with_stats(model.bn_layers)
    running = running_moments(layers)
    captured: list = [None] * len(layers)
    sizes = [1] * len(layers)

    def hook(i):
        def fn(_module, args):
            x = args[0]
            sizes[i] = x[0, 0].numel() if x.dim() > 2 else 1
            captured[i] = per_image_sums(x)
        return fn

    parts: dict[str, list] = {m: [] for m in BN_METRICS} | {"msp": [], "energy": []}
    handles = [bn.register_forward_pre_hook(hook(i)) for i, (_, bn) in enumerate(layers)]
    try:
        for batch in iter_batches(hub_dfq.load_images(data), model.preprocess, batch_size=batch_size):
            if not batch.indices:
                continue
            logits = model.module(batch.pixel_values).float()
            for metric in BN_METRICS:
                per_layer = image_layer_divergences(captured, sizes, running, divergence_fn(metric))
                parts[metric].append(aggregate_layers(per_layer.T))
            parts["msp"].append(-logits.softmax(-1).amax(-1).double())
            parts["energy"].append(-torch.logsumexp(logits, -1).double())
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v).numpy() for k, v in parts.items()}


def fpr_at_95_tpr(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Share of OOD images accepted by the threshold that accepts 95% of in-distribution images."""
    threshold = np.quantile(id_scores, 0.95)
    return float((ood_scores <= threshold).mean())


# ---- throughput ---------------------------------------------------------------------------------

@torch.inference_mode()
def _plain(model, data, batch_size: int) -> int:
    n = 0
    for batch in iter_batches(hub_dfq.load_images(data), model.preprocess, batch_size=batch_size):
        if batch.indices:
            model.module(batch.pixel_values)
            n += len(batch.indices)
    return n


def throughput(model, data, *, batch_size: int, repeats: int) -> dict[str, float]:
    n = _plain(model, data, batch_size)  # warm-up
    best = {"plain": 0.0, "score": 0.0}
    for _ in range(repeats):
        start = time.perf_counter()
        _plain(model, data, batch_size)
        best["plain"] = max(best["plain"], n / (time.perf_counter() - start))
        start = time.perf_counter()
        score_images(model, data, batch_size=batch_size, progress=False)
        best["score"] = max(best["score"], n / (time.perf_counter() - start))
    return {"images": n, "plain_img_s": best["plain"], "score_img_s": best["score"],
            "ratio": best["score"] / best["plain"]}


# ---- one model ----------------------------------------------------------------------------------

def run_model(name: str, spec: str, build, *, n: int, bns: tuple[int, int], batch_size: int, repeats: int,
              seed: int, throughput_n: int) -> dict:
    t0 = time.perf_counter()
    model = hub_dfq.load_model(spec)
    clean, calib_real, sets = build(model, n, seed)
    ref = detect(model, clean, batch_size)
    # the bench's own hooks and score_images agree (the library is what is measured)
    lib = score_images(model, clean, batch_size=batch_size, progress=False).scores
    assert np.allclose(lib, ref["reverse_kl"], rtol=1e-6), "bench and score_images disagree"
    rows = {}
    for set_name, data in sets.items():
        scores = detect(model, data, batch_size)
        row = {}
        for det in BN_METRICS + ("msp", "energy"):
            row[det] = {"auroc": auroc(ref[det].tolist(), scores[det].tolist()),
                        "fpr95": fpr_at_95_tpr(ref[det], scores[det])}
        row["n"] = int(len(scores["msp"]))
        rows[set_name] = row
        print(f"  {name} {set_name}: BN {row['reverse_kl']['auroc']:.3f} MSP {row['msp']['auroc']:.3f} "
              f"energy {row['energy']['auroc']:.3f}", flush=True)
    # thresholds calibrated without real data (BNS) and on a disjoint real sample, checked on the clean images
    cal = {}
    for kind, source in (("bns", "bns"), ("real", calib_real)):
        start = time.perf_counter()
        t = calibrate_threshold(model, 0.05, calibration=source, images=bns[0] if kind == "bns" else 1000,
                                iters=bns[1], seed=seed, batch_size=batch_size)
        cal[kind] = {"threshold": t["value"], "images": t["images"], "iters": bns[1] if kind == "bns" else None,
                     "fpr_on_clean": float((ref["reverse_kl"] > t["value"]).mean()),
                     "seconds": time.perf_counter() - start}
        print(f"  {name} threshold ({kind}): fpr on clean {cal[kind]['fpr_on_clean']:.3f}", flush=True)
    speed = throughput(model, clean.select(range(min(throughput_n, len(clean)))), batch_size=batch_size,
                       repeats=repeats)
    return {"model": spec, "n_clean": int(len(ref["msp"])), "sets": rows, "calibration": cal, "throughput": speed,
            "seconds": time.perf_counter() - t0}


def _family(set_name: str) -> str:
    return set_name.rsplit("-", 1)[0] if set_name[-1].isdigit() else set_name


def table(result: dict) -> str:
    lines = [f"### {result['model']} ({result['n_clean']} in-distribution images)", "",
             "| set | images | AUROC BN | AUROC MSP | AUROC energy | FPR@95 BN | FPR@95 MSP | FPR@95 energy "
             "| AUROC BN kl / w2 |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for set_name, row in result["sets"].items():
        best = max(DETECTORS, key=lambda d: row["reverse_kl" if d == "bn" else d]["auroc"])
        cells = []
        for d in DETECTORS:
            value = f"{row['reverse_kl' if d == 'bn' else d]['auroc']:.3f}"
            cells.append(f"**{value}**" if d == best else value)
        lines.append(f"| {set_name} | {row['n']} | " + " | ".join(cells) + " | "
                     + " | ".join(f"{row['reverse_kl' if d == 'bn' else d]['fpr95']:.3f}" for d in DETECTORS)
                     + f" | {row['kl']['auroc']:.3f} / {row['w2']['auroc']:.3f} |")
    wins = {}
    for set_name, row in result["sets"].items():
        fam = _family(set_name)
        bn_best = row["reverse_kl"]["auroc"] > max(row["msp"]["auroc"], row["energy"]["auroc"])
        wins.setdefault(fam, []).append(bn_best)
    lines += ["", "BN score above both MSP and energy (AUROC), per family: "
              + ", ".join(f"{fam} {sum(v)}/{len(v)}" for fam, v in wins.items()), ""]
    cal = result["calibration"]
    lines += [f"Threshold for fpr 0.05, share of the in-distribution images it flags: BNS-calibrated "
              f"({cal['bns']['images']} images x {cal['bns']['iters']} steps) {cal['bns']['fpr_on_clean']:.3f}; "
              f"real-calibrated ({cal['real']['images']} disjoint real images) {cal['real']['fpr_on_clean']:.3f}.", ""]
    s = result["throughput"]
    lines += [f"Throughput ({s['images']} images, decode + preprocess + forward): plain {s['plain_img_s']:.1f} img/s, "
              f"score_images {s['score_img_s']:.1f} img/s, ratio {s['ratio']:.2f}.", ""]
    return "\n".join(lines)


def scale(n: int, batch_size: int, seed: int) -> dict:
    """``score_images`` on ``n`` Lite0 images at 224 px (the 500 shared images repeated): wall time, images/s,
    and the process's peak resident memory after a quarter of the images and after all of them."""
    import resource

    model = hub_dfq.load_model(f"local-dir:{SHARED / 'models/imagenet-efficientnet-lite0'}")
    real = hub_dfq.load_images(str(SHARED / "data/imagenet-sample/even-classes.parquet")).dataset
    many = datasets.concatenate_datasets([real] * ((n + len(real) - 1) // len(real))).select(range(n))
    out = {"images": n}
    start = time.perf_counter()  # the plain forward pass on the quarter, under the same load
    out["plain_quarter_img_s"] = _plain(model, many.select(range(n // 4)), batch_size) / (time.perf_counter() - start)
    for part, rows in (("quarter", n // 4), ("all", n)):
        start = time.perf_counter()
        result = score_images(model, many.select(range(rows)), batch_size=batch_size, progress=False)
        wall = time.perf_counter() - start
        out[part] = {"images": result.n_images, "wall_s": wall, "img_s": result.n_images / wall,
                     "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    out["minutes_per_10k"] = 10_000 / out["all"]["img_s"] / 60
    out["ratio_quarter"] = out["quarter"]["img_s"] / out["plain_quarter_img_s"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lite0-n", type=int, default=150, help="in-distribution ImageNet images (max 250)")
    parser.add_argument("--cifar-n", type=int, default=1000, help="in-distribution CIFAR-10 test images")
    parser.add_argument("--lite0-bns", type=int, nargs=2, default=(16, 64), metavar=("IMAGES", "ITERS"))
    parser.add_argument("--cifar-bns", type=int, nargs=2, default=(64, 200), metavar=("IMAGES", "ITERS"))
    parser.add_argument("--models", nargs="+", default=["lite0", "resnet20", "resnet44"])
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, metavar="N",
                        help="only time score_images on N Lite0 images at 224 px (and its peak memory at N/4 and N)")
    parser.add_argument("--out", default=str(ROOT / "scripts/results/bench_ood.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.scale:
        result = scale(args.scale, args.batch_size, args.seed)
        print(f"score_images, Lite0 224 px, {args.threads} thread(s): {result['all']['img_s']:.1f} img/s on "
              f"{args.scale} images ({result['minutes_per_10k']:.1f} min per 10,000; plain forward on the first "
              f"{args.scale // 4}: {result['plain_quarter_img_s']:.1f} img/s, ratio {result['ratio_quarter']:.2f}); "
              "peak RSS "
              f"{result['quarter']['peak_rss_mib']:.0f} MiB after {args.scale // 4}, "
              f"{result['all']['peak_rss_mib']:.0f} MiB after {args.scale}")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": {"threads": args.threads, "torch": torch.__version__},
                                              "scale": result}, indent=2) + "\n")
        return 0
    configs = {
        "lite0": (f"local-dir:{SHARED / 'models/imagenet-efficientnet-lite0'}", imagenet_sets, args.lite0_n,
                  tuple(args.lite0_bns), 64),
        "resnet20": (f"local-dir:{SHARED / 'models/cifar10-resnet20'}", cifar_sets, args.cifar_n,
                     tuple(args.cifar_bns), 500),
        "resnet44": (f"local-dir:{SHARED / 'models/cifar10-resnet44'}", cifar_sets, args.cifar_n,
                     tuple(args.cifar_bns), 500),
    }
    results = {}
    for name in args.models:
        spec, build, n, bns, tn = configs[name]
        results[name] = run_model(name, spec, build, n=n, bns=bns, batch_size=args.batch_size,
                                  repeats=args.repeats, seed=args.seed, throughput_n=tn)
        print(table(results[name]), flush=True)
    total = time.perf_counter() - start
    meta = {"threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "argv": sys.argv[1:] if argv is None else argv, "wall_s": total}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"total {total:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
