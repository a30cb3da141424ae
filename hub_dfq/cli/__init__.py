"""The ``hub-dfq`` command: a thin layer over the public API.

Each sub-command lives in its own module with ``register(subparsers)`` and ``run(args)``. Building the
parser imports only the registries, never torch, so ``hub-dfq --help`` is instant; ``run`` imports
the API it calls. Errors hub-dfq raises on purpose (bad input) are printed as one line with exit
code 2, anything else as one line with exit code 1; ``HUB_DFQ_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
from typing import NoReturn, Sequence

from .. import __version__
from ..errors import HubDfqError
from . import audit as audit_cmd
from . import cache as cache_cmd
from . import eval as eval_cmd
from . import export as export_cmd
from . import info as info_cmd
from . import quantize as quantize_cmd
from . import registries as list_cmd
from . import score as score_cmd
from . import synth as synth_cmd
from .launch import world_rank
from .options import check_json_path, check_no_empty, check_repo_ids, cli_message

__all__ = ["main", "build_parser"]

COMMANDS = [info_cmd, eval_cmd, synth_cmd, quantize_cmd, export_cmd, audit_cmd, score_cmd, list_cmd, cache_cmd]


_INVALID_CHOICE = re.compile(r"argument (\S+): invalid choice: '(.*)' \(choose from (.*)\)")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors, in the words the library uses for the same mistake."""

    def error(self, message: str) -> NoReturn:
        match = _INVALID_CHOICE.match(message)
        if match:
            flags, value, choices = match.groups()
            action = next((a for a in self._actions if a.option_strings and flags.split("/")[0] in a.option_strings),
                          None)
            name = action.dest if action is not None else flags
            message = f"unknown {name} {value!r}: use one of {choices.replace(chr(39), '')}"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _one_line(text: str, limit: int = 800) -> str:
    """A message on one line (library errors can span many), shortened to ``limit`` characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hub-dfq",
        description="Compress Hugging Face Hub vision models without their training data, publish the results, "
        "and audit datasets against what a model's BatchNorm layers remember.",
    )
    parser.add_argument("--version", action="version", version=f"hub-dfq {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        command.register(sub)
    return parser


def _show_budgets() -> None:
    """Print the budget a run plans (and the time it expects) before it starts, as a plain line."""
    budget_logger = logging.getLogger("hub_dfq.budget")
    if budget_logger.level == logging.NOTSET or budget_logger.level > logging.INFO:
        handler = _CurrentStderrHandler()
        handler.setFormatter(_PlanFormatter())
        budget_logger.addHandler(handler)
        budget_logger.setLevel(logging.INFO)
        # why: the root handler passes whatever a child logger lets through, so the plan would print twice
        budget_logger.propagate = False


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record arrives."""

    # why: `main()` may run many times in one process (tests, notebooks); a stream bound at the first call
    # can be closed by the time a later library call logs its plan
    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _PlanFormatter(logging.Formatter):
    """The plan as a plain line; a warning as the root handler writes it."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return message if record.levelno == logging.INFO else f"{record.levelname}: {message}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or a usage error already printed as one line
        return int(exit_.code or 0)
    args.argv = argv  # for the "reproduce" line of published cards
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    if not args.verbose:  # verbose runs print it with every other INFO line
        _show_budgets()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    world, rank = world_rank()
    previous = _terminate_like_interrupt(world)
    try:
        return _call(args, world, rank)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a batch scheduler), raised where the process is, like Ctrl-C."""


def _raise_terminated(signum, frame) -> NoReturn:
    raise _Terminated()


def _terminate_like_interrupt(world: int):
    """Make SIGTERM unwind like Ctrl-C: locks released, temporaries and staging folders removed, exit code 143.

    why: by default SIGTERM killed the process where it stood, leaving lock files beside the user's outputs.
    Not in a launched process (a rank blocked in a collective would never see the exception; the launcher
    handles its own signals) nor off the main thread (only it may set handlers). Returns the handler it replaced.
    """
    if world > 1 or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def _call(args: argparse.Namespace, world: int, rank: int) -> int:
    """Run the command: its exit code, every error as one line."""
    # In a multi-process run an error every rank raises is printed once, by rank 0; others name their rank.
    where = f"[rank {rank}] " if rank else ""
    try:
        check_no_empty(args)  # `--out ''` would silently mean no output
        check_json_path(args)  # every command writes it last: refuse a bad path first
        check_repo_ids(args)  # an upload comes last too
        return int(args.func(args) or 0)
    except HubDfqError as err:
        if os.environ.get("HUB_DFQ_DEBUG"):
            raise
        everywhere = world > 1 and getattr(err, "raised_on_every_rank", False)
        if not (rank and everywhere):
            print(f"hub-dfq {args.command}: error: {where}{_one_line(cli_message(str(err), args.parser))}",
                  file=sys.stderr)
        if everywhere:
            _settle()
        return 2
    except KeyboardInterrupt as err:
        terminated = isinstance(err, _Terminated)
        print(f"hub-dfq {args.command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    except BrokenPipeError:  # the reader went away (`hub-dfq list | head`): nothing left to say
        sys.stdout = open(os.devnull, "w")
        return 0
    except Exception as err:  # noqa: BLE001 - the last resort: one line instead of a traceback
        if os.environ.get("HUB_DFQ_DEBUG"):
            raise
        if type(err).__name__ == "OutOfMemoryError":  # torch.cuda's; matched by name: torch may not be loaded
            print(f"hub-dfq {args.command}: error: {where}the GPU ran out of memory ({_one_line(str(err))[:200]}): "
                  + ("lower --batch-size, or " if hasattr(args, "batch_size") else "") + "pass --device cpu",
                  file=sys.stderr)
            return 2
        print(f"hub-dfq {args.command}: internal error: {where}{type(err).__name__}: {_one_line(str(err))} (this is "
              "a bug in hub-dfq or a library it uses; set HUB_DFQ_DEBUG=1 for the traceback and report it)",
              file=sys.stderr)
        return 1


def _settle() -> None:
    """After an error every rank raised alike, leave together: the launcher stops the others as soon as one
    process exits with an error, and rank 0 must have printed it by then."""
    from ..distributed import process_group  # why: only reached in a multi-process run, where torch is loaded

    try:
        process_group().barrier()
    except RuntimeError as err:  # the group is gone already: nothing left to wait for
        logging.getLogger(__name__).debug("could not wait for the other processes: %s", err)


if __name__ == "__main__":
    sys.exit(main())
