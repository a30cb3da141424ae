"""``hub-dfq synth MODEL --method bns --n N --out DIR``: calibration images from the model alone."""

from __future__ import annotations

import argparse

from .options import add_model_arguments, load_model_from_args, write_json


def register(sub) -> None:
    from ..synth.config import LOSSES, METHODS, PRECISIONS

    parser = sub.add_parser(
        "synth", help="generate synthetic calibration images from a model (Gaussian, Inception, BNS, BNS+I)",
        description="Generate images from nothing but the model and write them as a Hub dataset folder "
        "(data/*.parquet, README.md card, preview.png, generation.json).")
    add_model_arguments(parser)
    parser.add_argument("--method", choices=METHODS, default="bns", help="generation method (default: bns)")
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--iters", type=int, help="optimisation steps per batch (default 200; gaussian: 0)")
    parser.add_argument("--batch-size", type=int, default=64, help="images optimised together (default 64)")
    parser.add_argument("--loss", choices=LOSSES, default="kl", help="BN loss: kl (the paper's, default) or l2 (ZeroQ)")
    parser.add_argument("--lr", type=float, help="peak Adam learning rate (default: 1.0 for bns/bns+i, 0.1 for inception)")
    parser.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    parser.add_argument("--shard-size", type=int, default=1024, help="rows per parquet shard (default 1024)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="bf16 autocast or fp32 (default auto: bf16 where the hardware is fast at it)")
    parser.add_argument("--out", required=True, help="output folder (a Hub dataset repository)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue an interrupted run with the same arguments")
    group.add_argument("--overwrite", action="store_true", help="replace another run's files in --out")
    parser.add_argument("--push-to-hub", metavar="REPO", help="also push the folder to this Hub dataset repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", help="also write a summary to this file ('-' for stdout)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..synth import synthesize
    from ..synth.writer import read_manifest

    if args.private and not args.push_to_hub:
        from ..errors import ConfigError

        raise ConfigError("--private only applies with --push-to-hub REPO")
    model = load_model_from_args(args)
    synthesize(model, args.method, args.n, iters=args.iters, batch_size=args.batch_size, loss=args.loss, lr=args.lr,
               seed=args.seed, out_dir=args.out, resume=args.resume, overwrite=args.overwrite,
               shard_size=args.shard_size, precision=args.precision, progress=not args.no_progress,
               push_to_hub=args.push_to_hub, private=args.private)
    manifest = read_manifest(__import__("pathlib").Path(args.out)) or {}
    div = manifest.get("bn_divergence") or {}
    start, end = (div.get("start") or {}).get("total"), (div.get("end") or {}).get("total")
    text = f"{manifest.get('num_rows')} {args.method} images in {args.out} ({manifest.get('num_shards')} shards)"
    if start is not None and end is not None:
        text += f"; BN divergence ({div.get('metric')}) {start:.4g} -> {end:.4g}"
    if manifest.get("wall_time_s") is not None:
        text += f"; {manifest['wall_time_s']:.1f} s"
    print(text)
    if args.push_to_hub:
        print(f"pushed to dataset repo {args.push_to_hub}")
    write_json(args.json, {"out": args.out, "method": args.method, "num_rows": manifest.get("num_rows"),
                           "bn_divergence": {"start": start, "end": end, "metric": div.get("metric")},
                           "wall_time_s": manifest.get("wall_time_s"), "push_to_hub": args.push_to_hub})
    return 0
