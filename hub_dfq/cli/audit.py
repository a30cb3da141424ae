"""``hub-dfq audit MODEL DATA [DATA ...]``: rank datasets by closeness to the model's training data."""

from __future__ import annotations

import argparse

from ..audit.registry import DIVERGENCES
from ..outputs import check_folder, reserve_folder
from .launch import add_launch_option, is_main_process, place, relaunch, world_rank
from .numbers import SEED_MAX, count
from .options import (
    add_common_options,
    add_dataset_options,
    add_model_arguments,
    model_kwargs,
    write_json,
)


def register(sub) -> None:
    parser = sub.add_parser(
        "audit", help="score how close datasets are to what the model was trained on (BN statistics)",
        description="Stream each dataset through the model and compare the moments at every BatchNorm input with "
        "the layer's running statistics. Prints a ranking; --out writes audit.json, audit.md and a per-layer plot.")
    add_model_arguments(parser)
    parser.add_argument("data", nargs="+", metavar="DATA",
                        help="datasets to audit: 'default', a Hub dataset id, parquet:PATH, a .parquet file or a "
                        "folder")
    add_dataset_options(parser, flag=None)
    parser.add_argument("--batch-size", type=count(1), default=64, help="images per forward pass (default 64)")
    parser.add_argument("--score-batch", type=count(1), default=64,
                        help="images per batch-level score and bootstrap unit (default 64)")
    parser.add_argument("--metric", choices=DIVERGENCES.names(), default="kl",
                        help="main divergence (default kl, the paper's); all are reported per layer")
    parser.add_argument("--references", choices=["auto", "gaussian", "none"], default="auto",
                        help="reference points: auto = BNS synthetic data (near) and Gaussian noise (far); "
                        "gaussian = noise only; none = raw divergences only")
    parser.add_argument("--reference-images", type=count(1), default=64, help="images per reference point (default 64)")
    parser.add_argument("--reference-iters", type=count(0), default=200,
                        help="BNS steps per batch of the near reference (default 200)")
    parser.add_argument("--bootstrap", type=count(0), default=200, help="bootstrap replicates (default 200, 0 = no CI)")
    parser.add_argument("--seed", type=count(0, SEED_MAX), default=0,
                        help="seed of the references and the bootstrap (default 0)")
    parser.add_argument("--no-cache", dest="cache", action="store_false", help="recompute the reference points")
    parser.add_argument("--out", dest="out_dir",
                        help="write audit.json, audit.md and audit_layers.png as this folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier audit in --out")
    add_launch_option(parser)
    add_common_options(parser, json_help="also write the JSON report to this file ('-' for stdout)")
    parser.set_defaults(func=run, parser=parser)


def run(args: argparse.Namespace) -> int:
    """Check ``--out``, hold its lock for the whole audit (rank 0 of a launch, before the model loads), then audit."""
    if args.out_dir and world_rank()[0] == 1:  # under a launch, the library checks it on rank 0 for everyone
        check_folder(args.out_dir, kind="audit", overwrite=args.overwrite)  # before any work
    launched = relaunch(args)  # --num-processes: this process only waits for the ones it starts
    if launched is not None:
        return launched
    if not args.out_dir or world_rank()[0] > 1:
        return _run(args)
    with reserve_folder(args.out_dir, kind="audit", overwrite=args.overwrite):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    # why: keeps `hub-dfq --help` (and a launching process) free of torch and datasets
    from ..audit.core import audit
    from ..audit.report import json_safe
    from ..audit.scores import SPAN_DECADES
    from ..models.loader import load_model

    model = place(load_model(args.model, **model_kwargs(args)))
    report = audit(
        model, args.data, limit=args.limit, batch_size=args.batch_size, score_batch=args.score_batch,
        metric=args.metric, references=args.references, reference_images=args.reference_images,
        reference_iters=args.reference_iters, bootstrap=args.bootstrap, seed=args.seed, split=args.split,
        image_column=args.image_column, streaming=args.streaming, cache=args.cache, out_dir=args.out_dir,
        overwrite=args.overwrite, progress=args.progress, token=args.token,
    )
    if not is_main_process():  # every process has the same report: rank 0 prints it
        return 0
    if args.json != "-":  # keep stdout parseable
        print(f"BN-statistics audit of {model.source.spec} ({len(report.model['bn_layers'])} BN layers, "
              f"metric {args.metric}); lower divergence = closer to the training data")
        near = report.references.get("near") or {}
        if near.get("failed") or near.get("skipped"):
            state = "was skipped" if near.get("skipped") else "failed"
            print(f"note: the near reference {state} ({near['error']}); similarity is log10(far / d) / "
                  f"{SPAN_DECADES:g} (noise only)")
        print(f"{'rank':>4}  {'divergence':>11}  {'95% CI':>23}  {'similarity':>10}  {'images':>7}  dataset")
        for c in report.ranking() + [c for c in report.candidates if c.rank is None]:
            ci = f"[{c.ci[0]:.4g}, {c.ci[1]:.4g}]" if c.ci else "-"
            sim = f"{c.similarity:.3f}" if c.similarity is not None else "-"
            div = f"{c.divergence:.4g}" if c.divergence is not None else "unscored"
            skipped = f" ({c.n_skipped} unreadable skipped)" if c.n_skipped else ""
            print(f"{c.rank or '-':>4}  {div:>11}  {ci:>23}  {sim:>10}  {c.n_images:>7}  {c.dataset}{skipped}")
        if args.out_dir:
            print(f"report written to {args.out_dir}/audit.md")
    write_json(args, json_safe(report.to_dict()))
    return 0
