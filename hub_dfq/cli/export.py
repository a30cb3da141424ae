"""``hub-dfq export CHECKPOINT --backend onnx --out model.onnx``: a quantized checkpoint for an integer backend."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..backends.registry import BACKENDS
from ..errors import ConfigError
from ..outputs import check_file
from ..registry import resolve
from .numbers import count
from .options import (
    add_common_options,
    add_dataset_options,
    choices_help,
    dataset_kwargs,
    write_json,
)


def register(sub) -> None:
    parser = sub.add_parser(
        "export", help="export a hub-dfq quantized checkpoint for an integer inference backend (ONNX Runtime, "
        "OpenVINO)",
        description="Write a quantized checkpoint (a folder or Hub repo made by `hub-dfq quantize "
        "--out/--push-to-hub`) for an inference backend that runs it with integer kernels; with --dataset, compare "
        "its top-1 with the PyTorch model's on labelled images.")
    parser.add_argument("checkpoint", help="quantized checkpoint: a folder, local-dir:PATH or ORG/NAME[@REV]")
    parser.add_argument("--revision", help="Hub revision of the checkpoint")
    parser.add_argument("--token", help="Hub token (default: the logged-in one, or HF_TOKEN)")
    parser.add_argument("--backend", choices=BACKENDS.names(), default="onnx",
                        help="backend: " + choices_help(BACKENDS, "onnx"))
    parser.add_argument("--out", dest="path", default=None,
                        help="the file to write (default: the backend's file name, e.g. model.onnx)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--batch-size", type=count(1), help="fix the batch dimension (default: dynamic)")
    parser.add_argument("--opset", type=count(13, 99), default=None,
                        help="ONNX opset, 13 or newer (default 17), for the backends that write ONNX")
    add_dataset_options(parser)
    add_common_options(parser, json_help="also write the summary to this file ('-' for stdout)")
    parser.set_defaults(func=run, parser=parser)


def run(args: argparse.Namespace) -> int:
    # why: keeps `hub-dfq --help` free of torch and the engines
    from ..data import load_images
    from ..evaluation import check_eval_labels, evaluate_accuracy
    from ..hub.checkpoint import from_pretrained
    from ..quant.data import images_to_tensor

    backend = BACKENDS.get(args.backend)
    backend.require()
    options = {"batch_size": args.batch_size, "opset": args.opset}
    unused = [f"--{k.replace('_', '-')}" for k, v in options.items()
              if v is not None and k not in backend.export_options]
    if unused:
        raise ConfigError(f"{' and '.join(unused)} do not apply to the {backend.name} backend (it takes "
                          f"{', '.join('--' + k.replace('_', '-') for k in backend.export_options) or 'none'})")
    out = Path(args.path or backend.file_name)
    # before the checkpoint is even read; never over the checkpoint or the images it reads
    inputs = [a.removeprefix("local-dir:").removeprefix("parquet:") for a in (args.checkpoint, args.dataset) if a]
    # `--out newdir/` is checked as typed: Path() drops the '/' that says a folder was meant
    for file in (args.path or out, *(out.with_suffix(suffix) for suffix in backend.sidecars)):
        check_file(file, overwrite=args.overwrite, argument="path", inputs=inputs)
    data = load_images(args.dataset, **dataset_kwargs(args)) if args.dataset else None
    qmodel = from_pretrained(args.checkpoint, revision=args.revision, token=args.token)
    if data is not None:  # labels the model cannot predict fail before the file is written, not after
        check_eval_labels(qmodel.model, data)
    resolve(backend.export)(qmodel, out, overwrite=args.overwrite,
                            **{k: v for k, v in options.items() if v is not None})
    summary = {"checkpoint": args.checkpoint, "backend": args.backend, "out": str(out), "bytes": out.stat().st_size}
    quiet = args.json == "-"
    if not quiet:
        print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    if data is not None:
        engine = resolve(backend.load)(out)
        torch_acc = evaluate_accuracy(qmodel.model, data, forward=qmodel, progress=args.progress)
        engine_acc = engine.evaluate(qmodel, data, progress=args.progress)
        agreement = resolve(backend.check)(qmodel, engine, images_to_tensor(qmodel.model, data))
        summary.update(agreement, dataset=data.spec, torch_top1=torch_acc["top1"])
        summary[f"{backend.name}_top1"] = engine_acc["top1"]
        if not quiet:
            print(f"top-1 on {data.spec} ({engine_acc['n']} images): PyTorch (simulated) {torch_acc['top1']:.2f}%  "
                  f"{backend.runtime} {engine_acc['top1']:.2f}%  (same prediction on "
                  f"{100 * agreement['top1_agreement']:.2f}%, max logit difference "
                  f"{agreement['max_abs_logit_diff']:.3g})")
    write_json(args, summary)
    return 0


__all__ = ["register", "run"]
