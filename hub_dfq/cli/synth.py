"""``hub-dfq synth MODEL --method bns --num-images N --out DIR``: calibration images from the model alone."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from ..outputs import check_folder, reserve_folder
from ..synth.registry import BN_LOSSES, PRECISIONS, SYNTH_METHODS
from .launch import add_launch_option, is_main_process, place, relaunch, world_rank
from .numbers import MAX_IMAGES, SEED_MAX, count, number
from .options import (
    add_common_options,
    add_model_arguments,
    choices_help,
    model_kwargs,
    write_json,
)


def register(sub) -> None:
    parser = sub.add_parser(
        "synth", help="generate synthetic calibration images from a model (" + ", ".join(SYNTH_METHODS.names()) + ")",
        description="Generate images from nothing but the model and write them as a Hub dataset folder "
        "(data/*.parquet, README.md card, preview.png, generation.json). Under `accelerate launch -m hub_dfq synth` "
        "(or with --num-processes) the processes share the shards; the folder is the same bytes.")
    add_model_arguments(parser)
    parser.add_argument("--method", choices=SYNTH_METHODS.names(), default="bns",
                        help="generation method: " + choices_help(SYNTH_METHODS, "bns"))
    parser.add_argument("--num-images", "--n", dest="num_images", type=count(1, MAX_IMAGES), required=True,
                        help="number of images")
    parser.add_argument("--iters", type=count(1),
                        help="optimisation steps per batch (default: the method's, 200; fewer for models that cost "
                        "more than the CIFAR ResNets: 64 for EfficientNet-Lite0 at 224 px)")
    parser.add_argument("--batch-size", type=count(1), default=64, help="images optimised together (default 64)")
    parser.add_argument("--loss", choices=BN_LOSSES.names(), default="rkl",
                        help="BN loss optimised: " + choices_help(BN_LOSSES, "rkl"))
    parser.add_argument("--lr", type=number(0.0, strict=True), help="peak Adam learning rate (default: the method's)")
    parser.add_argument("--noise", choices=("white", "pink"),
                        help="noise the images start from: white (the paper's) or pink (a photograph's 1/f spectrum); "
                             "default: the method's (pink for bns+p, white for the others)")
    parser.add_argument("--seed", type=count(0, SEED_MAX), default=0, help="run seed (default 0)")
    parser.add_argument("--shard-size", type=count(1), default=1024, help="rows per parquet shard (default 1024)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="bf16 or fp32 arithmetic in the loop (default auto: bf16 where the hardware is fast "
                        "at it)")
    parser.add_argument("--out", dest="out_dir", required=True, help="output folder (a Hub dataset repository)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue an interrupted run with the same arguments")
    group.add_argument("--overwrite", action="store_true",
                       help="replace the dataset hub-dfq wrote in --out (other files there are kept)")
    parser.add_argument("--push-to-hub", metavar="REPO", help="also push the folder to this Hub dataset repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    add_launch_option(parser)
    add_common_options(parser)
    parser.set_defaults(func=run, parser=parser)


def run(args: argparse.Namespace) -> int:
    """Check the arguments and ``--out``, hold its lock for the whole run, then synthesize.

    Under a launch (several processes) the library checks and locks the folder on rank 0 and tells every
    rank the outcome, so a refusal is one error, printed once.
    """
    if args.private and not args.push_to_hub:
        raise ConfigError("`private` only applies with `push_to_hub`")
    if world_rank()[0] == 1:
        check_folder(args.out_dir, kind="dataset", overwrite=args.overwrite, resume=args.resume)  # before any work
    launched = relaunch(args)  # --num-processes: this process only waits for the ones it starts
    if launched is not None:
        return launched
    if world_rank()[0] > 1:
        return _run(args)
    with reserve_folder(args.out_dir, kind="dataset", overwrite=args.overwrite, resume=args.resume):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    # why: keeps `hub-dfq --help` (and a launching process) free of torch
    from ..models.loader import load_model
    from ..synth.api import synthesize_folder
    from ..synth.writer import read_manifest

    model = place(load_model(args.model, **model_kwargs(args)))
    folder = synthesize_folder(model, args.method, args.num_images, iters=args.iters, batch_size=args.batch_size,
                               loss=args.loss, lr=args.lr, seed=args.seed, out_dir=args.out_dir, resume=args.resume,
                               overwrite=args.overwrite, shard_size=args.shard_size, precision=args.precision,
                               progress=args.progress, push_to_hub=args.push_to_hub, private=args.private,
                               token=args.token, regularizers={"noise": args.noise} if args.noise else None)
    manifest = read_manifest(folder) or {}
    div = manifest.get("bn_divergence") or {}
    start, end = (div.get("start") or {}).get("total"), (div.get("end") or {}).get("total")
    text = f"{manifest.get('num_rows')} {args.method} images in {args.out_dir} ({manifest.get('num_shards')} shards)"
    if start is not None and end is not None:
        text += f"; BN divergence ({div.get('metric')}) {start:.4g} -> {end:.4g}"
    if manifest.get("wall_time_s") is not None:
        text += f"; {manifest['wall_time_s']:.1f} s"
    if not is_main_process():  # every process has the same result: rank 0 reports it
        return 0
    if args.json != "-":
        print(text)
        if args.push_to_hub:
            print(f"pushed to dataset repo {args.push_to_hub}")
    write_json(args, {"out": args.out_dir, "method": args.method, "num_rows": manifest.get("num_rows"),
                           "fingerprint": manifest.get("fingerprint"),
                           "bn_divergence": {"start": start, "end": end, "metric": div.get("metric")},
                           "wall_time_s": manifest.get("wall_time_s"), "push_to_hub": args.push_to_hub})
    return 0
