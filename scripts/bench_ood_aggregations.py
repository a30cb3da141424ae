"""Data-free ways to combine the per-image BN statistics (issue 21 follow-up): AUROC per shift and BNS-threshold FPR.

``hub_dfq.score_images`` scores an image by ``reverse_kl`` between its per-channel spatial moments and the BN
running statistics, averaged over channels, then the geometric mean over layers. The heavy-JPEG signal of
EfficientNet-Lite0 sits in two or three layers and the geometric mean dilutes it (``scripts/README.md``,
bench_ood). This script keeps every image's per-channel mean and variance at every BN input (one forward pass
per set, the sets of ``bench_ood.py``) and compares aggregations that need no real data: the layers' baseline
or spread comes from the model alone (running statistics; its BNS synthetic images, 64 x 200 steps, the
unshrunk default of ``calibrate_threshold``), never from the test sets.

Per channel ``c`` of a layer, with the image's spatial mean ``m`` and variance ``v`` and the running
``mu``, ``s2``: ``r = v / s2``, ``z2 = (m - mu)^2 / s2``, ``reverse_kl = (r - 1 - log r + z2) / 2``,
``T = r + z2`` (the mean square of the BN-normalised activation: ``E[T] = 1`` over the training data).

Rows (the names the README's table uses):

* A today: geometric mean over layers of the channel-mean ``reverse_kl``;
* B arithmetic mean; C geometric mean weighted by channels;
* D/E/F/G: per-layer log scores centred (median) or standardised (mean, sd) by the model's BNS images, then
  top-5 mean / log-mean-exp / max / mean over layers; H Mahalanobis over layers (BNS covariance, shrunk 0.9
  to its diagonal);
* I/J: the variance term ``(r - 1 - log r) / 2`` or the mean term ``z2 / 2`` alone, geometric mean;
* K: ``z2`` averaged over every channel (neural-mean-discrepancy-like chi-square, no learned detector);
  L: the largest layer mean of ``z2`` (``E[z2] <= 1`` per channel: a common scale);
* M/N: max and root-mean-square over layers of ``|log T_l|``, ``T_l`` the channel mean of ``T`` (known centre);
* R (not data-free, a ceiling): per-layer log score standardised by real reference images, then max.

Usage (from the repository root; ~5 minutes on 1 thread when the BNS images are cached, Lite0's 64 x 200
take ~30 minutes to synthesise otherwise)::

    OMP_NUM_THREADS=1 python scripts/bench_ood_aggregations.py

Prints a markdown table and writes scripts/results/bench_ood_aggregations.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_ood as B  # noqa: E402  (the same sets and split)

import hub_dfq  # noqa: E402
from hub_dfq.audit import references as refs  # noqa: E402
from hub_dfq.audit.moments import per_image_sums  # noqa: E402
from hub_dfq.bnstats import bn_layers_with_stats, running_moments  # noqa: E402
from hub_dfq.data import iter_batches  # noqa: E402

EPS = 1e-5  # as hub_dfq.bnstats
LITE0 = ["jpeg-1", "jpeg-4", "blur-4", "contrast-2", "cifar10-upscaled", "gaussian-noise"]
CIFAR = ["noise-2", "noise-4", "jpeg-4", "blur-4", "contrast-2", "gaussian-noise", "imagenet-32px"]


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    from scipy.stats import rankdata
    ranks = rankdata(np.r_[neg, pos])
    return float((ranks[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2) / (len(neg) * len(pos)))


@torch.inference_mode()
def moments(model, data, layers) -> dict[str, np.ndarray]:
    """Per image: ``r`` and ``z2`` of every channel of every BN input (float64, channels of all layers), logits."""
    running = running_moments(layers)
    mu = torch.cat([m.double() for m, _ in running])
    s2 = torch.cat([v.double() for _, v in running]) + EPS
    captured: list = [None] * len(layers)
    sizes = [1] * len(layers)

    def hook(i):
        def fn(_module, args):
            sizes[i] = args[0][0, 0].numel()
            captured[i] = per_image_sums(args[0])
        return fn

    handles = [bn.register_forward_pre_hook(hook(i)) for i, (_, bn) in enumerate(layers)]
    r, z2, logits = [], [], []
    try:
        for batch in iter_batches(hub_dfq.load_images(data), model.preprocess, batch_size=50):
            logits.append(model.module(batch.pixel_values).double())
            mean = torch.cat([s.double() / n for (s, _), n in zip(captured, sizes)], 1)
            var = (torch.cat([q.double() / n for (_, q), n in zip(captured, sizes)], 1) - mean.square()).clamp_min(0)
            r.append((var + EPS) / s2)
            z2.append((mean - mu).square() / s2)
    finally:
        for h in handles:
            h.remove()
    return {"r": torch.cat(r).numpy(), "z2": torch.cat(z2).numpy(), "logits": torch.cat(logits).numpy()}


def features(m: dict[str, np.ndarray], widths: np.ndarray) -> dict[str, np.ndarray]:
    """Per image and layer (channel means): reverse_kl, its variance and mean terms, T; z2 over all channels."""
    seg = np.repeat(np.arange(len(widths)), widths)

    def per_layer(x):
        out = np.zeros((x.shape[0], len(widths)))
        np.add.at(out.T, seg, x.T)
        return out / widths

    var_term = 0.5 * (m["r"] - 1 - np.log(m["r"]))
    logits = m["logits"] - m["logits"].max(1, keepdims=True)
    p = np.exp(logits)
    return {"rkl": per_layer(var_term + 0.5 * m["z2"]), "var": per_layer(var_term), "mean": per_layer(0.5 * m["z2"]),
            "T": per_layer(m["r"] + m["z2"]), "z2all": m["z2"].mean(1),
            "msp": -(p / p.sum(1, keepdims=True)).max(1), "energy": -(m["logits"].max(1) + np.log(p.sum(1)))}


def log(x):
    return np.log(np.maximum(x, 1e-12))


def _maha(x, s, lam=0.9):
    cov = np.cov(s.T)
    prec = np.linalg.pinv((1 - lam) * cov + lam * np.diag(np.diag(cov)))
    d = x - s.mean(0)
    return np.einsum("ij,jk,ik->i", d, prec, d)


def _z(x, s):
    return (x - s.mean(0)) / (s.std(0) + 1e-9)


# name -> f(features of the set, features of the model's BNS images, features of real reference images, widths)
VARIANTS = {
    "MSP": lambda f, b, ref, w: f["msp"],
    "energy": lambda f, b, ref, w: f["energy"],
    "A gm reverse_kl (today)": lambda f, b, ref, w: log(f["rkl"]).mean(1),
    "B arithmetic mean": lambda f, b, ref, w: f["rkl"].mean(1),
    "C channel-weighted gm": lambda f, b, ref, w: (log(f["rkl"]) * w).sum(1) / w.sum(),
    "D BNS-centred, top-5 layers": lambda f, b, ref, w: np.sort(log(f["rkl"]) - np.median(log(b["rkl"]), 0), 1)[:, -5:]
    .mean(1),
    "E BNS-centred, log-mean-exp": lambda f, b, ref, w: np.log(np.exp(log(f["rkl"]) - np.median(log(b["rkl"]), 0))
                                                              .mean(1)),
    "F BNS z, max": lambda f, b, ref, w: _z(log(f["rkl"]), log(b["rkl"])).max(1),
    "G BNS z, mean": lambda f, b, ref, w: _z(log(f["rkl"]), log(b["rkl"])).mean(1),
    "H Mahalanobis (BNS)": lambda f, b, ref, w: _maha(log(f["rkl"]), log(b["rkl"])),
    "I gm variance term": lambda f, b, ref, w: log(f["var"]).mean(1),
    "J gm mean term": lambda f, b, ref, w: log(f["mean"]).mean(1),
    "K chi2 z2, all channels": lambda f, b, ref, w: f["z2all"],
    "L max layer mean z2": lambda f, b, ref, w: f["mean"].max(1),
    "M max |log T_l|": lambda f, b, ref, w: np.abs(log(f["T"])).max(1),
    "N rms log T_l": lambda f, b, ref, w: np.sqrt((log(f["T"]) ** 2).mean(1)),
    "R real-ref z, max (not data-free)": lambda f, b, ref, w: _z(log(f["rkl"]), log(ref["rkl"])).max(1),
}


def run_model(name: str, spec: str, n: int, bns_images: int, bns_steps: int) -> dict:
    model = hub_dfq.load_model(spec)
    if name == "lite0":
        clean, ref, sets = B.imagenet_sets(model, n, 0)
        ref, shifts = ref.select(range(min(n, len(ref)))), LITE0
    else:
        clean, ref, sets = B.cifar_sets(model, n, 0)
        shifts = CIFAR
    layers = bn_layers_with_stats(model.bn_layers)
    widths = np.array([bn.running_mean.numel() for _, bn in layers])
    start = time.perf_counter()
    bns = refs.synth_near_dataset(model, n=bns_images, seed=0, steps=bns_steps, progress=False)
    feats = {k: features(moments(model, d, layers), widths)
             for k, d in {"clean": clean, "ref": ref, "bns": bns, **{s: sets[s] for s in shifts}}.items()}
    out = {}
    for variant, fn in VARIANTS.items():
        score = {k: fn(f, feats["bns"], feats["ref"], widths) for k, f in feats.items()}
        row = {s: auroc(score["clean"], score[s]) for s in shifts}
        row["fpr_bns"] = float((score["clean"] > np.quantile(score["bns"], 0.95)).mean())
        row["fpr_real"] = float((score["clean"] > np.quantile(score["ref"], 0.95)).mean())
        out[variant] = row
    print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return {"in_distribution": len(feats["clean"]["rkl"]), "bns": f"{bns_images} x {bns_steps}", "rows": out,
            "diagnostics": diagnostics(feats, "jpeg-4")}


def diagnostics(feats: dict, shift: str) -> dict:
    """What the model provides and what it does not (uses the test sets: a diagnosis, not a rule).

    * ``T`` identity: per layer, the clean images' mean of ``T_l`` (1 if the running statistics are the
      data's); the spread over layers.
    * Whether BNS images stand in for real ones per layer: Spearman correlation over layers of the spread
      (sd of the log score) on BNS vs real reference images, and of the medians.
    * ``shift``'s best single layer (two-sided AUROC, with the direction), per statistic: a ceiling for any
      rule that weights layers without knowing which matter.
    * The threshold with a guarantee: ``E[T_c] = 1`` and Markov + a union over layers make
      ``max_l T_l > L / 0.05`` flag at most 5% of in-distribution images; the share it flags of each set.
    """
    from scipy.stats import spearmanr
    clean, bns, ref, x = feats["clean"], feats["bns"], feats["ref"], feats[shift]
    t_mean = clean["T"].mean(0)
    best = {}
    for stat in ("rkl", "T", "mean", "var"):
        a = np.array([auroc(clean[stat][:, j], x[stat][:, j]) for j in range(clean[stat].shape[1])])
        j = int(np.argmax(np.maximum(a, 1 - a)))
        best[stat] = {"layer": j, "auroc": float(max(a[j], 1 - a[j])), "direction": "up" if a[j] >= 0.5 else "down"}
    bound = clean["T"].shape[1] / 0.05
    return {
        "clean_mean_T_per_layer": {"median": float(np.median(t_mean)), "min": float(t_mean.min()),
                                   "max": float(t_mean.max())},
        "spearman_layer_sd_bns_vs_real": float(spearmanr(log(bns["rkl"]).std(0), log(ref["rkl"]).std(0))[0]),
        "spearman_layer_median_bns_vs_real": float(spearmanr(np.median(log(bns["rkl"]), 0),
                                                             np.median(log(ref["rkl"]), 0))[0]),
        f"best_single_layer_{shift}": best,
        "markov_threshold": {"value": bound, **{k: float((f["T"].max(1) > bound).mean()) for k, f in feats.items()}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lite0-n", type=int, default=150)
    parser.add_argument("--cifar-n", type=int, default=1000)
    parser.add_argument("--bns", type=int, nargs=2, default=[64, 200], metavar=("IMAGES", "STEPS"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "scripts/results/bench_ood_aggregations.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shared = ROOT.parent / "shared/models"
    results = {
        "lite0": run_model("lite0", f"local-dir:{shared}/imagenet-efficientnet-lite0", args.lite0_n, *args.bns),
        "resnet20": run_model("resnet20", f"local-dir:{shared}/cifar10-resnet20", args.cifar_n, *args.bns),
        "resnet44": run_model("resnet44", f"local-dir:{shared}/cifar10-resnet44", args.cifar_n, *args.bns),
    }
    Path(args.out).write_text(json.dumps(results, indent=1))
    for name, res in results.items():
        cols = list(next(iter(res["rows"].values())))
        print(f"\n{name} ({res['in_distribution']} in-distribution images, BNS {res['bns']})\n")
        print("| variant | " + " | ".join(cols) + " |")
        print("|---|" + "---:|" * len(cols))
        for variant, row in res["rows"].items():
            print(f"| {variant} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
        print("\ndiagnostics:", json.dumps(res["diagnostics"]))


if __name__ == "__main__":
    main()
