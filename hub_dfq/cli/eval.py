"""``hub-dfq eval MODEL --dataset DATA``: top-1 / top-5 accuracy (of a float or a quantized checkpoint)."""

from __future__ import annotations

import argparse

from .launch import add_launch_option, is_main_process, place, relaunch
from .numbers import count
from .options import (
    add_common_options,
    add_dataset_options,
    add_model_arguments,
    dataset_kwargs,
    model_kwargs,
    write_json,
)


def register(sub) -> None:
    parser = sub.add_parser("eval", help="top-1 / top-5 accuracy of a model (or a quantized checkpoint) on labelled "
                                         "images")
    add_model_arguments(parser)
    add_dataset_options(parser, default="default")
    parser.add_argument("--batch-size", type=count(1), default=128, help="images per forward pass (default 128)")
    add_launch_option(parser)
    add_common_options(parser)
    parser.set_defaults(func=run, parser=parser)


def run(args: argparse.Namespace) -> int:
    launched = relaunch(args)  # --num-processes: this process only waits for the ones it starts
    if launched is not None:
        return launched
    # why: keeps `hub-dfq --help` (and a launching process) free of torch, timm and datasets
    from ..data import load_images
    from ..evaluation import evaluate_accuracy
    from ..models.loader import load_model

    model = place(load_model(args.model, **model_kwargs(args)))
    data = load_images(args.dataset, **dataset_kwargs(args))
    result = evaluate_accuracy(model, data, batch_size=args.batch_size, progress=args.progress)
    if not is_main_process():  # every process has the same counts: rank 0 reports them
        return 0
    print(f"{model.source.spec} on {data.spec} ({data.split or 'all'}): top-1 {result['top1']:.2f}%  "
          f"top-5 {result['top5']:.2f}%  ({result['n']} images"
          + (f", {result['skipped']} unreadable skipped" if result["skipped"] else "") + ")")
    write_json(args, {"model": model.source.spec, "dataset": data.spec, "split": data.split, **result})
    return 0
