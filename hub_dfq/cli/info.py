"""``hub-dfq info MODEL``: what a model is and what the pipeline sees of it."""

from __future__ import annotations

import argparse

from .options import add_common_options, add_model_arguments, model_kwargs, write_json


def register(sub) -> None:
    parser = sub.add_parser("info", help="describe a model: library, input, parameters, BN and weight layers, labels")
    add_model_arguments(parser)
    add_common_options(parser, json_help="write the summary as JSON to this file ('-' or no value: stdout)")
    parser.set_defaults(func=run, parser=parser)


def run(args: argparse.Namespace) -> int:
    from ..models.loader import (
        load_model,  # why: keeps `hub-dfq --help` free of torch and timm
    )

    info = load_model(args.model, **model_kwargs(args)).info()
    if args.json == "-":
        write_json("-", info)
        return 0
    pre = info["preprocess"]
    labels = info["labels"]
    shown = ", ".join(labels[:10]) + (f", ... ({len(labels)} in all)" if len(labels) > 10 else "")
    rows = [
        ("model", info["spec"]),
        ("library", f"{info['library']} ({info['architecture']})"),
        ("source", info["repo_id"] and f"{info['repo_id']}@{info['commit'] or 'latest'}" or "local"),
        ("license", info["license"] or "unknown"),
        ("quantized", info["quantized"] or "no"),
        ("input", f"{'x'.join(map(str, info['input_size']))}, mean {tuple(round(v, 4) for v in pre['mean'])}, "
                  f"std {tuple(round(v, 4) for v in pre['std'])}, {pre['interpolation']}, "
                  f"resize {pre['resize']}, crop {pre['crop']}"),
        ("parameters", f"{info['parameters']:,}"),
        ("BN layers", info["bn_layers"]),
        ("conv / linear", f"{info['conv_layers']} / {info['linear_layers']}"),
        ("classes", f"{info['num_classes']}: {shown}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    write_json(args, info)
    return 0
