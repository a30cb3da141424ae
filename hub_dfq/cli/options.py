"""Options shared by the sub-commands, and their translation into API calls and back.

Every option's ``dest`` is the name of the API argument it sets, so a library error that names an
argument (`` `resume=True` ``) is printed with the flag that sets it (``--resume``): see
:func:`cli_message`. Nothing here imports torch: building the parser must stay fast.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from importlib import resources
from typing import Any

from ..errors import ConfigError
from ..outputs import check_file, write_text
from .launch import world_rank
from .numbers import count

__all__ = ["add_model_arguments", "add_dataset_options", "add_common_options", "dataset_kwargs", "model_kwargs",
           "write_json", "cli_message", "choices_help", "check_repo_ids", "check_no_empty"]


def choices_help(registry, default: str | None = None) -> str:
    """``name: summary`` of every entry of a registry, for an option's help."""
    parts = []
    for entry in registry:
        mark = " (default)" if entry.name == default else ""
        parts.append(f"{entry.name}{mark}: {entry.summary}" if getattr(entry, "summary", None) else entry.name + mark)
    return "; ".join(parts).replace("%", "%%")  # argparse formats help strings with %


def add_common_options(parser: argparse.ArgumentParser, *, json_help: str = "also write the result as JSON to this "
                       "file ('-' for stdout)") -> None:
    """``--json PATH`` and ``--progress/--no-progress``, which every command takes."""
    parser.add_argument("--json", metavar="PATH", nargs="?", const="-", help=json_help)
    if "--overwrite" not in parser._option_string_actions:  # commands with an --out have their own
        parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show progress bars (default: only on a terminal)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model spec: 'default', ORG/NAME[@REV], hf-hub:ORG/NAME, local-dir:PATH, "
                        "a folder or a timm name; a hub-dfq quantized checkpoint loads too")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) of the model")
    parser.add_argument("--token", help="Hub token (default: the logged-in one, or HF_TOKEN)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow transformers models whose code lives in their repository")
    parser.add_argument("--random-init", dest="pretrained", action="store_false",
                        help="build the architecture with random weights instead of loading them")
    add_device_option(parser)


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        help="where to compute: auto (a CUDA GPU when there is one, else the CPU; under a launch, "
                        "each process's own device), cpu, cuda or cuda:N (default auto)")


def device_of(args: argparse.Namespace) -> str | None:
    """The ``device`` argument for the API: ``None`` under a multi-process launch with ``auto`` (each process's
    device is then the launcher's choice, see :func:`hub_dfq.cli.launch.place`)."""
    return None if args.device == "auto" and world_rank()[0] > 1 else args.device


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"revision": args.revision, "token": args.token, "trust_remote_code": args.trust_remote_code,
            "pretrained": args.pretrained, "device": device_of(args)}


def add_dataset_options(parser: argparse.ArgumentParser, *, flag: str | None = "--dataset",
                        default: str | None = None) -> None:
    """Options of :func:`hub_dfq.load_images`; with ``flag=None`` the dataset is positional."""
    if flag:
        parser.add_argument(flag, dest="dataset", default=default,
                            help="images: 'default', a Hub dataset id, parquet:PATH, a .parquet file or a folder"
                            + (f" (default: {default})" if default else ""))
    parser.add_argument("--split", help="dataset split (default: test, then validation, then train)")
    parser.add_argument("--dataset-config", dest="dataset_config", help="dataset configuration name on the Hub")
    parser.add_argument("--limit", type=count(1), help="use only the first N images")
    parser.add_argument("--image-column", help="column holding the images (auto-detected)")
    parser.add_argument("--label-column", help="column holding the labels (auto-detected)")
    parser.add_argument("--streaming", action="store_true", help="stream the dataset instead of downloading it")


def dataset_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "split": args.split,
        "dataset_config": args.dataset_config,
        "limit": args.limit,
        "image_column": args.image_column,
        "label_column": args.label_column,
        "streaming": args.streaming,
        "token": getattr(args, "token", None),
    }


_INPUT_OPTIONS = ("model", "checkpoint", "dataset", "data", "calibration", "eval_data")
_OUTPUT_OPTIONS = ("out_dir", "path")
_PREFIXES = ("local-dir:", "parquet:")


def _paths(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    found = []
    for name in names:
        values = getattr(args, name, None)
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, str) and value:
                found.append(next((value[len(p):] for p in _PREFIXES if value.startswith(p)), value))
    if "default" in found and names is _INPUT_OPTIONS:  # the embedded model and data
        found.append(str(resources.files("hub_dfq") / "assets"))
    return found


def check_json_path(args: argparse.Namespace | str | None) -> None:
    """Refuse a ``--json`` target that hub-dfq may not write, before any work starts (see
    :func:`hub_dfq.outputs.check_file`): an existing file without ``--overwrite``; a link, a FIFO, a folder;
    what the command reads (the model, the datasets) or writes (``--out``); a file of a hub-dfq result."""
    path = args if not isinstance(args, argparse.Namespace) else getattr(args, "json", None)
    if not path or path == "-":
        return
    if not isinstance(args, argparse.Namespace):
        check_file(path, overwrite=False, argument="json")
        return
    check_file(path, overwrite=bool(getattr(args, "overwrite", False)), argument="json",
               inputs=_paths(args, _INPUT_OPTIONS), outputs=_paths(args, _OUTPUT_OPTIONS))


def write_json(args: argparse.Namespace | str | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` to stdout (``--json -``) or, atomically, to the ``--json`` file, checked again first
    (:func:`check_json_path`: the run may have created what it names)."""
    path = args if not isinstance(args, argparse.Namespace) else getattr(args, "json", None)
    if not path:
        return
    text = json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"
    if path == "-":
        sys.stdout.write(text)
        return
    check_json_path(args)
    write_text(path, text)


def check_no_empty(args: argparse.Namespace) -> None:
    """Refuse an option given as an empty string (``--out ''``, ``--json ''``, ``--eval ''``): commands test
    ``if args.out_dir``, so it would silently mean "no output" (or no evaluation) instead of a mistake."""
    for action in getattr(args, "parser", argparse.ArgumentParser())._actions:
        values = getattr(args, action.dest, None) if action.dest != "token" else None  # `--token ''`: no token
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, str) and not value.strip():
                name = action.dest if action.option_strings else action.metavar or action.dest
                raise ConfigError(f"`{name}` is empty: give a value, or leave the option out")


def check_repo_ids(args: argparse.Namespace) -> None:
    """Refuse a malformed Hub repository name (``--push-to-hub``, ``--push-dataset``) before any work: found only
    at the upload, it would throw the run's minutes away."""
    from huggingface_hub.errors import HFValidationError  # why: only commands that push pay for the import
    from huggingface_hub.utils import validate_repo_id

    for name in ("push_to_hub", "dataset_repo"):
        value = getattr(args, name, None)
        if value is None:
            continue
        try:
            validate_repo_id(value)
        except HFValidationError as err:
            raise ConfigError(f"`{name}` {value!r} is not a Hub repository name ({err}): use ORG/NAME or NAME, "
                              "with letters, digits, '-', '_' and '.'") from err


_ARGUMENT = re.compile(r"`([A-Za-z_]\w*)(?:=([^`]*))?`")


def cli_message(message: str, parser: argparse.ArgumentParser | None) -> str:
    """A library message with its `` `argument` `` / `` `argument=value` `` mentions spelled as CLI flags."""
    actions = {a.dest: a for a in (parser._actions if parser is not None else []) if a.option_strings}

    def flag(match: re.Match) -> str:
        name, value = match.group(1), match.group(2)
        action = actions.get(name)
        if action is None:
            return name if value is None else f"{name}={value}"
        long = max(action.option_strings, key=len)
        if isinstance(action, argparse.BooleanOptionalAction):
            return f"--no-{long[2:]}" if value == "False" else long
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) or value is None:
            return long
        return f"{long} {value.strip(chr(39))}"

    return _ARGUMENT.sub(flag, message)
