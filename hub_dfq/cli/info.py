"""``hub-dfq info MODEL``: what a model is and what the pipeline sees of it."""

from __future__ import annotations

import argparse
import json

from .options import add_model_arguments, load_model_from_args


def register(sub) -> None:
    parser = sub.add_parser("info", help="describe a model: library, input, parameters, BN and weight layers, labels")
    add_model_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    info = load_model_from_args(args).info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    pre = info["preprocess"]
    labels = info["labels"]
    shown = ", ".join(labels[:10]) + (f", ... ({len(labels)} in all)" if len(labels) > 10 else "")
    rows = [
        ("model", info["spec"]),
        ("library", f"{info['library']} ({info['architecture']})"),
        ("source", info["repo_id"] and f"{info['repo_id']}@{info['commit'] or 'latest'}" or "local"),
        ("license", info["license"] or "unknown"),
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
    return 0
