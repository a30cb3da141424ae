"""The ``hub-dfq`` command: a thin layer over the public API.

Each sub-command lives in its own module with ``register(subparsers)``; errors hub-dfq raises on
purpose are printed as one line (set ``HUB_DFQ_DEBUG=1`` for the traceback) with exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from ..errors import HubDfqError
from . import audit as audit_cmd
from . import eval as eval_cmd
from . import export as export_cmd
from . import info as info_cmd
from . import quantize as quantize_cmd
from . import synth as synth_cmd

__all__ = ["main", "build_parser"]

COMMANDS = [info_cmd, eval_cmd, audit_cmd, quantize_cmd, synth_cmd, export_cmd]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="hub-dfq",
        description="Compress Hugging Face Hub vision models without their training data, publish the results, "
        "and audit datasets against what a model's BatchNorm layers remember.",
    )
    parser.add_argument("--version", action="version", version=f"hub-dfq {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # for the "reproduce" line of published cards
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except HubDfqError as err:
        if os.environ.get("HUB_DFQ_DEBUG"):
            raise
        print(f"hub-dfq {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hub-dfq {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
