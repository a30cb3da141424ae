"""``hub-dfq export CHECKPOINT --out model.onnx``: a published quantized model as an integer ONNX graph."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import OutputExistsError
from .options import add_dataset_options, dataset_kwargs, write_json


def register(sub) -> None:
    parser = sub.add_parser(
        "export", help="export a hub-dfq quantized checkpoint to ONNX (int8 kernels in ONNX Runtime)",
        description="Write a quantized checkpoint (a folder or Hub repo made by `hub-dfq quantize --out/--push-to-hub`) "
        "as an ONNX QDQ graph that ONNX Runtime runs with integer kernels; with --dataset, compare its top-1 "
        "with the PyTorch model's on labelled images.")
    parser.add_argument("checkpoint", help="quantized checkpoint: a folder, local-dir:PATH or ORG/NAME[@REV]")
    parser.add_argument("--revision", help="Hub revision of the checkpoint")
    parser.add_argument("--out", default="model.onnx", help="the .onnx file to write (default model.onnx)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--batch-size", type=int, help="fix the batch dimension (default: dynamic)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset, 13 or newer (default 17)")
    add_dataset_options(parser)
    parser.add_argument("--json", help="also write the summary to this file ('-' for stdout)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data import load_images
    from ..evaluation import evaluate_accuracy
    from ..export import compare_onnx, export_onnx, from_pretrained, load_onnx
    from ..quant.data import images_to_tensor

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise OutputExistsError(f"{out} exists: choose another --out or pass --overwrite")
    qmodel = from_pretrained(args.checkpoint, revision=args.revision)
    export_onnx(qmodel, out, batch_size=args.batch_size, opset=args.opset)
    summary = {"checkpoint": args.checkpoint, "out": str(out), "bytes": out.stat().st_size}
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    if args.dataset:
        data = load_images(args.dataset, **dataset_kwargs(args))
        session = load_onnx(out)
        torch_acc = evaluate_accuracy(qmodel.model, data, forward=qmodel)
        onnx_acc = session.evaluate(qmodel, data)
        agreement = compare_onnx(qmodel, session, images_to_tensor(qmodel.model, data))
        summary.update(agreement, dataset=data.spec, torch_top1=torch_acc["top1"], onnx_top1=onnx_acc["top1"])
        print(f"top-1 on {data.spec} ({onnx_acc['n']} images): PyTorch (simulated) {torch_acc['top1']:.2f}%  "
              f"ONNX Runtime {onnx_acc['top1']:.2f}%  (same prediction on {100 * agreement['top1_agreement']:.2f}%, "
              f"max logit difference {agreement['max_abs_logit_diff']:.3g})")
    write_json(args.json, summary)
    return 0


__all__ = ["register", "run"]
