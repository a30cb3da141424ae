"""``hub-dfq score MODEL DATA [--out DIR]``: one BN score per image; find and filter the ones that do not belong."""

from __future__ import annotations

import argparse
import math

from ..audit.registry import DIVERGENCES
from ..errors import ConfigError
from ..outputs import check_folder
from .numbers import MAX_IMAGES, SEED_MAX, count, number
from .options import add_common_options, add_dataset_options, add_model_arguments, model_kwargs, write_json


def register(sub) -> None:
    parser = sub.add_parser(
        "score", help="score every image against what the model's BN layers remember; filter the atypical ones",
        description="Stream the dataset through the model and give each image a score: how far its own "
        "activation statistics at every BatchNorm input sit from the layer's running statistics (higher = less "
        "like the training data). --out writes the dataset with bn_score and index columns as a Hub dataset "
        "folder (split train = kept rows, rejected = filtered-out rows) with a card, histogram and previews.")
    add_model_arguments(parser)
    parser.add_argument("data", metavar="DATA",
                        help="dataset: 'default', a Hub dataset id, parquet:PATH, a .parquet file or a folder")
    add_dataset_options(parser, flag=None)
    parser.add_argument("--metric", choices=DIVERGENCES.names(), default="reverse_kl",
                        help="per-channel divergence (default reverse_kl: KL(image || running statistics))")
    parser.add_argument("--batch-size", type=count(1), default=64, help="images per forward pass (default 64)")
    parser.add_argument("--fpr", type=float,
                        help="calibrate a threshold that flags this share of in-distribution images, on the model's "
                        "own BNS synthetic images (no real data); without --keep-fraction/--max-score it filters")
    parser.add_argument("--calibration", default="bns",
                        help="what --fpr is calibrated on: bns (the model's own synthetic images, no real data; "
                        "they score lower than real images, so the rate comes out high) or a dataset of trusted "
                        "in-distribution images (default bns)")
    parser.add_argument("--calibration-images", type=count(2, MAX_IMAGES),
                        help="calibration images for --fpr (default: 64 BNS images, fewer for models that cost more "
                        "than the CIFAR ResNets, 20 for EfficientNet-Lite0; all rows of a --calibration dataset)")
    parser.add_argument("--calibration-iters", type=count(1),
                        help="BNS steps for the calibration images (default 200, fewer for costly models: 64 for "
                        "EfficientNet-Lite0 at 224 px)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--keep-fraction", type=float, help="keep the lowest-scoring share of images, in (0, 1]")
    group.add_argument("--max-score", type=number(-math.inf), help="keep images scoring at most this")
    parser.add_argument("--seed", type=count(0, SEED_MAX), default=0, help="seed of the calibration images (default 0)")
    parser.add_argument("--out", dest="out_dir", help="write the scored dataset as this Hub dataset folder")
    parser.add_argument("--overwrite", action="store_true", help="replace a scored dataset hub-dfq wrote in --out")
    parser.add_argument("--shard-size", type=count(1), default=1000, help="rows per parquet shard (default 1000)")
    parser.add_argument("--push-to-hub", metavar="REPO", help="also push the folder to this Hub dataset repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--top", type=int, default=5, help="least typical rows to print (default 5)")
    add_common_options(parser)
    parser.set_defaults(func=run, parser=parser)


def run(args: argparse.Namespace) -> int:
    if args.keep_fraction is not None and not 0.0 < args.keep_fraction <= 1.0:
        raise ConfigError(f"`keep_fraction` must be in (0, 1] (the share of images to keep), got {args.keep_fraction}")
    if args.out_dir:
        check_folder(args.out_dir, kind="scores", overwrite=args.overwrite)  # before the model loads
    # why: keeps `hub-dfq --help` free of torch and datasets
    from ..audit.images import score_images
    from ..audit.report import json_safe
    from ..models.loader import load_model

    model = load_model(args.model, **model_kwargs(args))
    result = score_images(
        model, args.data, metric=args.metric, batch_size=args.batch_size, limit=args.limit, split=args.split,
        image_column=args.image_column, streaming=args.streaming, fpr=args.fpr, calibration=args.calibration,
        calibration_images=args.calibration_images, calibration_iters=args.calibration_iters,
        keep_fraction=args.keep_fraction, max_score=args.max_score, seed=args.seed, out_dir=args.out_dir,
        overwrite=args.overwrite, shard_size=args.shard_size, push_to_hub=args.push_to_hub, private=args.private,
        progress=args.progress, token=args.token, device=args.device)
    summary = result.summary()
    if args.json != "-":
        q = summary["quantiles"]
        print(f"{result.n_images} images of {result.dataset} scored on {model.source.spec} ({args.metric}, "
              f"{len(result.model['bn_layers'])} BN layers; higher = less like the training data): median "
              f"{q['median']:.4g}, p5 {q['p05']:.4g}, p95 {q['p95']:.4g}; "
              f"{result.timing['images_per_s']:.1f} images/s")
        if result.n_skipped:
            shown = ", ".join(str(s["index"]) for s in result.skipped[:10])
            print(f"{result.n_skipped} unreadable image(s) not scored (rows {shown}"
                  f"{', ...' if result.n_skipped > 10 else ''})")
        if result.threshold:
            t = result.threshold
            print(f"threshold for fpr {t['fpr']:g}: {t['value']:.4g} (from {t['images']} images of "
                  f"{t['calibration']}); {t['flagged']} images score above it")
        if result.selection:
            s = result.selection
            print(f"filter {s['rule']} {s['value']:g}: kept {s['kept']} (score <= {s['max_score']:.4g}), "
                  f"rejected {s['rejected']}")
        order = result.order()[::-1][: max(0, args.top)]
        if len(order):
            print("least typical rows: " + ", ".join(f"{result.indices[i]} ({result.scores[i]:.4g})" for i in order))
        if args.out_dir:
            print(f"scored dataset written to {args.out_dir} (README.md, scores.json, data/)")
        if args.push_to_hub:
            print(f"pushed to dataset repo {args.push_to_hub}")
    write_json(args, json_safe({**result.to_dict(), "out": args.out_dir, "push_to_hub": args.push_to_hub}))
    return 0
