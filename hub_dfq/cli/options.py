"""Argument groups shared by several sub-commands, and their translation into API calls."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model spec: 'default', ORG/NAME[@REV], hf-hub:ORG/NAME, local-dir:PATH, "
                        "a folder or a timm name")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) of the model")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow transformers models whose code lives in their repository")


def load_model_from_args(args: argparse.Namespace):
    from ..models import load_model

    return load_model(args.model, revision=args.revision, trust_remote_code=args.trust_remote_code)


def add_dataset_options(parser: argparse.ArgumentParser, *, flag: str | None = "--dataset",
                        default: str | None = None) -> None:
    """Options of :func:`hub_dfq.load_images`; with ``flag=None`` the dataset is positional."""
    if flag:
        parser.add_argument(flag, dest="dataset", default=default,
                            help="images: 'default', a Hub dataset id, parquet:PATH, a .parquet file or a folder"
                            + (f" (default: {default})" if default else ""))
    parser.add_argument("--split", help="dataset split (default: test, then validation, then train)")
    parser.add_argument("--dataset-config", dest="dataset_config", help="dataset configuration name on the Hub")
    parser.add_argument("--limit", type=int, help="use only the first N images")
    parser.add_argument("--image-column", help="column holding the images (auto-detected)")
    parser.add_argument("--label-column", help="column holding the labels (auto-detected)")
    parser.add_argument("--streaming", action="store_true", help="stream the dataset instead of downloading it")


def dataset_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "split": args.split,
        "config": args.dataset_config,
        "limit": args.limit,
        "image_column": args.image_column,
        "label_column": args.label_column,
        "streaming": args.streaming,
    }


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if not path:
        return
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    if path == "-":
        sys.stdout.write(text)
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(target)  # atomic: a crash never leaves half a JSON file
