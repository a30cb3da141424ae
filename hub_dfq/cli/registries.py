"""``hub-dfq list``: every registered method, algorithm, observer, preset, backend, divergence and adapter.

``--markdown`` prints the tables of ``docs/extending.md`` (a test checks that the docs match).
"""

from __future__ import annotations

import argparse

from ..audit.registry import DIVERGENCES
from ..backends.registry import BACKENDS
from ..models.adapters import detection_order
from ..quant.registry import ACT_OBSERVERS, PRESETS, QUANT_ALGORITHMS, WEIGHT_OBSERVERS
from ..synth.registry import BN_LOSSES, SYNTH_METHODS
from .options import add_common_options, write_json

__all__ = ["register", "run", "tables"]


def _flags(entry, names: tuple[str, ...]) -> str:
    return ", ".join(name.replace("_", " ") for name in names if getattr(entry, name)) or "-"


def _placement(rules) -> str:
    if not rules.output_quantizers:
        return "no output quantizers (its kernels dequantize their own output)"
    return "output quantizers where a float op reads a layer, after " + ", ".join(rules.fused_activations)


def _calibration(preset) -> str:
    """The preset's image count, then each algorithm's own split of it (images x synthesis steps)."""
    cells = [str(preset.calibration_images)]
    for name in preset.by_algorithm:
        split = preset.for_algorithm(name)
        cells.append(f"{name}: {split.calibration_images} x {split.synth.get('iters')} steps")
    return "; ".join(cells)


def tables() -> dict[str, tuple[list[str], list[list[str]]]]:
    """Title -> (header, rows) of every registry."""
    return {
        "Synthesis methods (`--method`)": (
            ["name", "what it does", "needs", "default iters", "default lr"],
            [[m.name, m.summary, _flags(m, ("needs_bn", "uses_logits", "class_targets")), str(m.iters), f"{m.lr:g}"]
             for m in SYNTH_METHODS]),
        "BN losses (`--loss`)": (["name", "what it measures"], [[m.name, m.summary] for m in BN_LOSSES]),
        "Quantization algorithms (`--algorithm`)": (
            ["name", "what it does", "resumable"],
            [[a.name, a.summary, "yes" if a.resumable else "no"] for a in QUANT_ALGORITHMS]),
        "Weight observers (`--weight-observer`)": (["name", "range"], [[o.name, o.summary] for o in WEIGHT_OBSERVERS]),
        "Activation observers (`--act-observer`)": (["name", "range"], [[o.name, o.summary] for o in ACT_OBSERVERS]),
        "Presets (`--preset`)": (
            ["name", "budget", "calibration images", "algorithm settings"],
            [[p.name, p.summary, _calibration(p),
              "; ".join(f"{k}: " + ", ".join(f"{f}={v}" for f, v in s.items()) for k, s in p.algorithms.items())]
             for p in PRESETS]),
        "Backends (`hub-dfq export --backend`)": (
            ["name", "what it writes", "file", "extra", "placement rules"],
            [[b.name, b.summary, f"`{b.file_name}`", b.requires or "-", _placement(b.placement)] for b in BACKENDS]),
        "Audit divergences (`hub-dfq audit --metric`)": (
            ["name", "per channel"], [[d.name, f"`{d.formula}`"] for d in DIVERGENCES]),
        "Model adapters": (["name", "reads"], [[a.name, a.summary] for a in detection_order()]),
    }


def markdown() -> str:
    """The tables as markdown, one section each."""
    out = []
    for title, (header, rows) in tables().items():
        out += [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        out.append("")
    return "\n".join(out)


def register(sub) -> None:
    parser = sub.add_parser("list", help="list the registered synthesis methods, algorithms, observers, presets, "
                                         "backends, divergences and model adapters")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables (as in docs/extending.md)")
    add_common_options(parser)
    parser.set_defaults(func=run, parser=parser)


def run(args: argparse.Namespace) -> int:
    if args.json != "-":
        if args.markdown:
            print(markdown())
        else:
            for title, (_, rows) in tables().items():
                print(title)
                for row in rows:
                    print(f"  {row[0]:<14} {row[1]}")
                print()
    write_json(args, {title: [dict(zip(header, row)) for row in rows]
                           for title, (header, rows) in tables().items()})
    return 0
