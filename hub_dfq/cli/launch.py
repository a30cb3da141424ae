"""``--num-processes N``: run a command on N processes of this machine through accelerate's launcher.

``hub-dfq synth ... --num-processes 4`` is ``accelerate launch --multi_gpu --num_processes 4 -m hub_dfq
synth ...`` (accelerate's launcher starts the processes with ``torch.distributed.run``): the same
processes ``accelerate launch`` would start, so everything else (one GPU per process where there are
GPUs, a gloo group of CPU processes where there are none) is accelerate's and
:mod:`hub_dfq.distributed`'s. Nothing here imports torch until a launch is asked for.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..errors import ConfigError
from .numbers import count

__all__ = ["add_launch_option", "relaunch", "world_rank", "place", "is_main_process"]

_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def add_launch_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-processes", dest="num_processes", type=count(1, 1024), metavar="N",
                        help="run on N processes of this machine (one per GPU, or N CPU processes) through "
                        "accelerate's launcher; on several machines use `accelerate launch -m hub_dfq ...` "
                        "(docs/distributed.md)")


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return default


def world_rank() -> tuple[int, int]:
    """``(world size, rank)`` announced by a launcher, read from the environment (no torch import)."""
    return _env_int(_WORLD_SIZE_VARIABLES, 1), _env_int(_RANK_VARIABLES, 0)


def is_main_process() -> bool:
    """Whether this process prints results and writes ``--json`` (rank 0, or the only process)."""
    return world_rank()[1] == 0


def _child_argv(argv: list[str]) -> list[str]:
    """``argv`` without ``--num-processes N`` (the launched processes must not launch again)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--num-processes":
            skip = True
        elif not item.startswith("--num-processes="):
            out.append(item)
    return out


def _threads_per_process(processes: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // processes)


def relaunch(args: argparse.Namespace) -> int | None:
    """Start ``args.num_processes`` processes running this command; their exit code, or ``None`` to run here.

    Raises:
        ConfigError: a non-positive ``num_processes``, or one that contradicts the launch this process
            is already part of.
    """
    wanted = getattr(args, "num_processes", None)
    if wanted is None:
        return None
    if wanted < 1:
        raise ConfigError(f"`num_processes` must be a positive integer, got {wanted}")
    world, _ = world_rank()
    if world > 1:
        if wanted != world:
            raise ConfigError(f"`num_processes` is {wanted}, but this process is one of {world} started by a "
                              "launcher: leave `num_processes` out under `accelerate launch`")
        return None
    if wanted == 1:
        return None
    # why: accelerate (and torch) load only when processes are to be started
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    os.environ.setdefault("OMP_NUM_THREADS", str(_threads_per_process(wanted)))  # torchrun would say 1, loudly
    launch_args = launch_command_parser().parse_args([
        "--multi_gpu", "--num_processes", str(wanted), "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", "0", "--module", "hub_dfq",
        *_child_argv(getattr(args, "argv", None) or sys.argv[1:])])
    try:
        launch_command(launch_args)
    except ChildFailedError as err:  # each process printed its own error already
        codes = [failure.exitcode for failure in err.failures.values()]
        return next((code for code in codes if code > 0), 1)
    return 0


def place(model: Any) -> Any:
    """Move ``model`` to this process's accelerator in a multi-process run (CPU runs leave it where it is)."""
    if world_rank()[0] <= 1:
        return model
    from ..distributed import process_group  # why: torch is already loaded by the model; keeps --help free of it

    device = process_group().device
    if device is not None and device.type != "cpu":
        model.to(device)
    return model
