"""Benchmark and validate BN-statistics audits (issue 6).

Two parts, measured side by side in one run:

1. Throughput: images/s of an audit vs plain inference on the same images, same batches, same
   decode + preprocessing (end to end), and forward-only on pre-decoded tensors (where the hooks'
   share of the cost is largest). Target: audit >= 0.8x plain inference.
2. Validation on the shared CIFAR-10 ResNet-20 and the first --n images of the shared test split:
   candidates = the clean split; Gaussian noise, Gaussian blur and contrast reduction at 5
   severities each (CIFAR-10-C parameters); the 10 single-class subsets (each class's first
   --n/2 images of the full split, 1,000 at most) with a clean subset of the same size for a
   fair comparison; uniform noise. Targets: clean ranks first; divergence strictly monotone in
   severity within each family; batch-level AUROC >= 0.99 for clean vs level 3 (64 images/batch).

Usage (from the repository root; ~3-5 minutes on one core with the defaults):

    OMP_NUM_THREADS=1 python scripts/bench_audit.py            # --n 2000 images per candidate
    OMP_NUM_THREADS=1 python scripts/bench_audit.py --n 256 --repeats 1   # smoke test

Prints a markdown table and writes scripts/results/bench_audit.json (plus the full audit report
in scripts/results/bench_audit_report/).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as TF

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

import hub_dfq  # noqa: E402
from hub_dfq.audit.core import measure_data, measure_tensors  # noqa: E402
from hub_dfq.audit.scores import auroc  # noqa: E402
from hub_dfq.data import decode_image, iter_batches  # noqa: E402

FEATURES = datasets.Features({"img": datasets.Image()})
# CIFAR-10-C severities 1..5 (Hendrycks & Dietterich, 2019), on pixels in [0, 1].
NOISE_SIGMA = [0.04, 0.06, 0.08, 0.09, 0.10]
BLUR_SIGMA = [0.4, 0.6, 0.7, 0.8, 1.0]
CONTRAST = [0.75, 0.5, 0.4, 0.3, 0.15]


# ---- candidates ----------------------------------------------------------------------------------

def _decode_all(cells) -> torch.Tensor:
    """Image cells -> uint8 tensor (N, 3, H, W)."""
    return torch.stack([TF.pil_to_tensor(decode_image(c).convert("RGB")) for c in cells])


def _to_dataset(pixels: torch.Tensor) -> datasets.Dataset:
    """Float pixels in [0, 1], (N, 3, H, W) -> a Dataset of lossless PNG images."""
    arrays = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    cells = []
    for array in arrays:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        cells.append({"bytes": buf.getvalue(), "path": None})
    return datasets.Dataset.from_dict({"img": cells}, features=FEATURES)


def gaussian_noise(x: torch.Tensor, level: int, gen: torch.Generator) -> torch.Tensor:
    return x + NOISE_SIGMA[level - 1] * torch.randn(x.shape, generator=gen)


def gaussian_blur(x: torch.Tensor, level: int, gen: torch.Generator) -> torch.Tensor:
    sigma = BLUR_SIGMA[level - 1]
    size = 2 * int(np.ceil(3 * sigma)) + 1
    return TF.gaussian_blur(x, [size, size], [sigma, sigma])


def contrast(x: torch.Tensor, level: int, gen: torch.Generator) -> torch.Tensor:
    c = CONTRAST[level - 1]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * c + mean


FAMILIES = {"gaussian_noise": gaussian_noise, "gaussian_blur": gaussian_blur, "contrast": contrast}


def build_candidates(test: datasets.Dataset, n: int, seed: int) -> dict[str, datasets.Dataset]:
    test = test.cast_column("img", datasets.Image(decode=False))
    clean = test.select(range(min(n, len(test))))
    x = _decode_all(clean["img"]).float() / 255.0
    gen = torch.Generator().manual_seed(seed)
    candidates = {"clean": clean}
    for family, fn in FAMILIES.items():
        for level in range(1, 6):
            candidates[f"{family}-{level}"] = _to_dataset(fn(x, level, gen))
    per_class = min(n // 2, 1000)
    candidates[f"clean@{per_class}"] = test.select(range(per_class))
    labels = np.asarray(test["label"])
    names = test.features["label"].names
    for k, name in enumerate(names):
        idx = np.flatnonzero(labels == k)[:per_class].tolist()
        candidates[f"class-{name}"] = test.select(idx)
    candidates["uniform_noise"] = _to_dataset(torch.rand(x.shape, generator=gen))
    return candidates


# ---- throughput ----------------------------------------------------------------------------------

@torch.inference_mode()
@torch.inference_mode()  # why: the audit's forward runs without autograd too; a fair baseline does the same
def _plain(model, data, batch_size: int) -> int:
    n = 0
    for batch in iter_batches(data, model.preprocess, batch_size=batch_size):
        if batch.indices:
            model.module(batch.pixel_values)
            n += len(batch.indices)
    return n


def throughput(model, data, *, batch_size: int, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` images/s, plain and audit interleaved so load changes hit both alike."""
    tensors = [b.pixel_values for b in iter_batches(data, model.preprocess, batch_size=batch_size)]
    n = sum(len(t) for t in tensors)
    best = {"plain_e2e": 0.0, "audit_e2e": 0.0, "plain_fwd": 0.0, "audit_fwd": 0.0}

    def timed(key, fn):
        start = time.perf_counter()
        fn()
        best[key] = max(best[key], n / (time.perf_counter() - start))

    def plain_fwd():
        with torch.inference_mode():
            for t in tensors:
                model.module(t)

    _plain(model, data, batch_size)  # warm-up
    for _ in range(repeats):
        timed("plain_e2e", lambda: _plain(model, data, batch_size))
        timed("audit_e2e", lambda: measure_data(model, data, batch_size=batch_size))
        timed("plain_fwd", plain_fwd)
        timed("audit_fwd", lambda: measure_tensors(model, tensors, name="fwd"))
    best["ratio_e2e"] = best["audit_e2e"] / best["plain_e2e"]
    best["ratio_fwd"] = best["audit_fwd"] / best["plain_fwd"]
    best["images"] = n
    return best


# ---- main ----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=f"local-dir:{SHARED / 'models' / 'cifar10-resnet20'}")
    parser.add_argument("--test", default=str(SHARED / "data" / "cifar10" / "test.parquet"))
    parser.add_argument("--n", type=int, default=2000, help="images per candidate (default 2000)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="throughput repeats (best is kept)")
    parser.add_argument("--references", default="auto", choices=["auto", "gaussian", "none"])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice / OMP_NUM_THREADS)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=str(ROOT / "scripts" / "results" / "bench_audit.json"))
    parser.add_argument("--report-dir", default=str(ROOT / "scripts" / "results" / "bench_audit_report"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = " ".join(["python scripts/bench_audit.py", *(sys.argv[1:] if argv is None else argv)])

    model = hub_dfq.load_model(args.model)
    test = datasets.load_dataset("parquet", data_files={"test": args.test})["test"]
    t0 = time.perf_counter()
    candidates = build_candidates(test, args.n, args.seed)
    build_s = time.perf_counter() - t0

    speed = throughput(model, hub_dfq.load_images(candidates["clean"]), batch_size=args.batch_size,
                       repeats=args.repeats)

    t0 = time.perf_counter()
    report = hub_dfq.audit(model, candidates, batch_size=args.batch_size, score_batch=64,
                           references=args.references, seed=args.seed, out_dir=args.report_dir, progress=False)
    audit_s = time.perf_counter() - t0

    rows = report.ranking()
    clean = report["clean"]
    monotone = {}
    for family in FAMILIES:
        divs = [report[f"{family}-{level}"].divergence for level in range(1, 6)]
        monotone[family] = all(b > a for a, b in zip([clean.divergence] + divs, divs))
    aurocs = {family: auroc(clean.batch_scores, report[f"{family}-3"].batch_scores) for family in FAMILIES}
    per_class = [name for name in candidates if name.startswith("clean@")][0]
    classes = [c for c in report.candidates if c.dataset.startswith("class-")]
    targets = {
        "clean_ranks_first": rows[0].dataset == "clean",
        f"{per_class}_beats_every_single_class_subset": all(report[per_class].divergence < c.divergence
                                                            for c in classes),
        "strictly_monotone_in_severity": monotone,
        "auroc_clean_vs_level3_at_64": aurocs,
        "auroc_target_met": all(v >= 0.99 for v in aurocs.values()),
        "throughput_target_met_e2e": speed["ratio_e2e"] >= 0.8,
    }

    lines = [f"Command: `OMP_NUM_THREADS={torch.get_num_threads()} {command}`", "",
             f"Model `{args.model}`, {args.n} images per candidate (single-class subsets: "
             f"{report[per_class].n_images}), batches of {args.batch_size}, torch threads {torch.get_num_threads()}.",
             "", "| throughput (img/s) | plain inference | audit | audit / plain |", "|---|---:|---:|---:|",
             f"| end to end (decode + preprocess + forward) | {speed['plain_e2e']:.0f} | {speed['audit_e2e']:.0f} | "
             f"{speed['ratio_e2e']:.2f} |",
             f"| forward only (pre-decoded tensors) | {speed['plain_fwd']:.0f} | {speed['audit_fwd']:.0f} | "
             f"{speed['ratio_fwd']:.2f} |", "",
             "| rank | candidate | images | divergence (KL) | 95% CI | similarity | batch median |",
             "|---:|---|---:|---:|---|---:|---:|"]
    for c in rows:
        med = (c.batch_summary or {}).get("median")
        lines.append(f"| {c.rank} | {c.dataset} | {c.n_images} | {c.divergence:.4g} | "
                     f"[{c.ci[0]:.4g}, {c.ci[1]:.4g}] | {c.similarity if c.similarity is None else round(c.similarity, 3)}"
                     f" | {med:.4g} |" if c.ci and med is not None else
                     f"| {c.rank} | {c.dataset} | {c.n_images} | {c.divergence:.4g} | – | – | – |")
    refs = report.references
    lines += ["", "References: " + ", ".join(
        f"{k} = {refs[k]['divergence']:.4g} ({refs[k]['method']}, {refs[k]['n_images']} images)"
        for k in ("near", "far") if refs.get(k)), "",
        "| target | result |", "|---|---|"]
    for key, value in targets.items():
        lines.append(f"| {key} | {json.dumps(value) if not isinstance(value, dict) else ', '.join(f'{k}: {v if isinstance(v, bool) else round(v, 4)}' for k, v in value.items())} |")
    lines.append("")
    lines.append(f"Building candidates {build_s:.1f} s; audit of {len(candidates)} candidates "
                 f"(+ references) {audit_s:.1f} s.")
    print("\n".join(lines))

    payload = {"command": command, "model": args.model, "n": args.n, "batch_size": args.batch_size,
               "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
               "throughput": speed, "targets": targets, "build_s": build_s, "audit_s": audit_s,
               "references": {k: {kk: v.get(kk) for kk in ("method", "n_images", "divergence", "cached")}
                              for k, v in refs.items() if v},
               "candidates": [{"dataset": c.dataset, "rank": c.rank, "n_images": c.n_images,
                               "divergence": c.divergence, "ci": c.ci, "similarity": c.similarity,
                               "batch_summary": c.batch_summary} for c in report.candidates]}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
