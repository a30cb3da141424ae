"""One view of the process group for the whole package: rank, world size and the few collectives hub-dfq needs.

hub-dfq does not launch processes itself: ``accelerate launch`` (or ``torchrun``, which it wraps, or
``mpirun``) starts them, and :func:`process_group` returns a :class:`Distributed` view over accelerate's
:class:`~accelerate.PartialState`. Without such a launch (world size 1) the view is a plain
single-process one and neither accelerate nor ``torch.distributed`` is touched, so every verb works
unchanged.

The collectives are those of ``accelerate.utils`` (``reduce``, ``gather_object``,
``broadcast_object_list``, ``wait_for_everyone``), so any accelerate configuration works: gloo on
CPUs, NCCL on GPUs, one machine or several. Two helpers keep failures from turning into hangs:
:meth:`Distributed.run_on_main` runs a step on rank 0 and re-raises its error on every rank, and
:meth:`Distributed.run_on_every_rank` lets every rank finish its part before anyone raises.

Inside ``with single_process():`` the view is single-process again, for work that only rank 0 does (a
reference measurement, a card) and that calls verbs which would otherwise wait for the other ranks.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import secrets
import socket
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import torch

from .errors import ConfigError, ErrorRecord, SharedFilesystemError

logger = logging.getLogger(__name__)

__all__ = ["Distributed", "process_group", "single_process", "launched", "DEFAULT_TIMEOUT_S", "current", "local"]

T = TypeVar("T")

# A rank can wait at a collective for as long as another rank works alone (an idle rank while the others
# synthesise for hours; every rank while rank 0 measures a reference). torch's default of 30 minutes is too
# short for that; HUB_DFQ_DIST_TIMEOUT (seconds) changes it when hub-dfq creates the process group.
DEFAULT_TIMEOUT_S = 24 * 3600
# How long a rank waits for a file rank 0 wrote to appear (NFS attribute caches can lag a few seconds).
_VISIBILITY_WAIT_S = 10.0

# environment variables with which launchers announce the number of processes
_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched() -> bool:
    """Whether this process is one of several started by a launcher (``accelerate launch``, ``torchrun``, ...)."""
    for name in _WORLD_SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 1:
            return True
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


class Distributed:
    """The process group as hub-dfq sees it; the base class is the single-process view.

    Attributes:
        rank: index of this process, 0 to ``world_size - 1``.
        world_size: number of processes.
        local_rank: index of this process on its machine.
        device: the device this process should compute on (``None``: wherever the model already is).
    """

    rank = 0
    world_size = 1
    local_rank = 0
    device: torch.device | None = None

    @property
    def enabled(self) -> bool:
        """Whether there is more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes shared files and pushes."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size})"

    # ---- collectives (no-ops in one process) ---------------------------------------------------
    def barrier(self) -> None:
        """Wait until every rank reaches this point."""

    def all_reduce(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Element-wise sums over the ranks (one collective for all tensors; dtypes and devices are kept)."""
        return list(tensors)

    def all_gather(self, value: Any) -> list[Any]:
        """``value`` of every rank, in rank order (any picklable object)."""
        return [value]

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        return value

    # ---- patterns built on them ----------------------------------------------------------------
    def run_on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and return its result on every rank.

        ``fn`` sees a single-process view (:func:`single_process`): verbs it calls do not wait for the other
        ranks. If ``fn`` raises on rank 0, every rank raises the same error, sent as an
        :class:`~hub_dfq.errors.ErrorRecord` (the same class for the classes of
        :data:`~hub_dfq.errors.ERROR_TYPES`, a :class:`~hub_dfq.errors.DistributedError` naming the original
        class otherwise), so no rank waits forever for a rank that failed.
        """
        if not self.enabled:
            return fn()
        outcome: tuple[bool, Any] | None = None
        failure: BaseException | None = None
        if self.is_main:
            try:
                with single_process():
                    outcome = (True, fn())
            except Exception as err:  # noqa: BLE001 - re-raised below on this rank, sent as data to the others
                failure = err
                outcome = (False, ErrorRecord.of(err, rank=0))
        outcome = self.broadcast(outcome)
        if failure is not None:
            raise _everywhere(failure)
        ok, value = outcome
        if not ok:
            raise _everywhere(value.to_error())
        return value

    def run_on_every_rank(self, fn: Callable[[], T]) -> list[T]:
        """Run ``fn`` on every rank; return every rank's result (rank order) or raise on every rank.

        A rank whose ``fn`` fails re-raises its own error once all ranks are done; the others raise the
        first failing rank's error, naming that rank.
        """
        if not self.enabled:
            return [fn()]
        result: Any = None
        failure: BaseException | None = None
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below once every rank has finished its part
            failure = err
        mine = (True, result) if failure is None else (False, ErrorRecord.of(failure, rank=self.rank))
        outcomes = self.all_gather(mine)
        if failure is not None:
            raise _everywhere(failure)
        for ok, value in outcomes:
            if not ok:
                raise _everywhere(value.to_error())
        return [value for _, value in outcomes]

    def check_same(self, what: str, values: Mapping[str, Any]) -> None:
        """Refuse to go on unless every rank was given the same ``values`` (raises on every rank).

        Args:
            what: the job, for the message (``"synthesis"``).
            values: ``{argument name: value}``; values are compared by ``repr``, nested mappings key by key
                (named ``outer.inner``).
        """
        if not self.enabled:
            return
        mine = {key: repr(value) for key, value in _flat(values).items()}
        everyone = self.all_gather(mine)
        reference = everyone[0]
        diffs = []
        for rank, theirs in enumerate(everyone[1:], start=1):
            for key in sorted(set(reference) | set(theirs)):
                if reference.get(key) != theirs.get(key):
                    diffs.append(f"`{key}` is {theirs.get(key)} on rank {rank} but {reference.get(key)} on rank 0")
        if diffs:
            raise _everywhere(ConfigError(
                f"the {self.world_size} processes of this {what} were given different arguments "
                f"({'; '.join(diffs[:8])}{'; ...' if len(diffs) > 8 else ''}): every process of a launch must run "
                "the same command; nothing was written"))

    def check_shared_folder(self, folder: Path, *, argument: str | None = None, what: str = "the folder",
                            hint: str = "") -> None:
        """Make sure every rank sees the same ``folder`` (raises on every rank otherwise).

        Rank 0 creates the folder and a probe file in it; every rank must read the probe back. On
        failure the probe (and a folder rank 0 had to create) is removed again.

        Args:
            folder: the output folder.
            argument: the API argument that named it, for the message (``"out_dir"``).
            what: what the folder is, when no argument named it.
            hint: appended to the message (what to do instead).

        Raises:
            SharedFilesystemError: some ranks cannot see what rank 0 wrote there.
        """
        if not self.enabled:
            return
        folder = Path(folder)
        token = self.broadcast(secrets.token_hex(8) if self.is_main else None)
        probe = folder / f".hub_dfq-probe-{token}"

        def create() -> bool:
            existed = folder.exists()
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_text(token)
            return existed

        existed = self.run_on_main(create)
        seen = _wait_for(lambda: probe.is_file() and probe.read_text() == token)
        views = self.all_gather((seen, socket.gethostname()))
        blind = [f"{rank} ({host})" for rank, (ok, host) in enumerate(views) if not ok]
        if self.is_main:
            probe.unlink(missing_ok=True)
            if blind and not existed and not any(folder.iterdir()):
                folder.rmdir()
        if blind:
            name = f"`{argument}`" if argument else what
            raise _everywhere(SharedFilesystemError(
                f"{name} {folder} is not the same folder on every process: rank(s) {', '.join(blind)} cannot see the "
                f"file rank 0 ({views[0][1]}) wrote there. Every process of a multi-process run writes into one "
                f"folder, so {name} must be on a filesystem that all processes share (e.g. NFS or Lustre), under "
                f"the same path on every machine{hint}"))


class _AccelerateGroup(Distributed):
    """The view over accelerate's ``PartialState`` (created by the first call to :func:`process_group`)."""

    def __init__(self, state: Any) -> None:
        # why: accelerate costs a second to import; a single process never needs it
        from accelerate.utils import broadcast_object_list, gather_object, reduce

        self._state = state
        self._reduce, self._gather, self._broadcast = reduce, gather_object, broadcast_object_list
        self.rank = state.process_index
        self.world_size = state.num_processes
        self.local_rank = state.local_process_index
        # accelerate names a CPU process's device "cpu:0"; hub-dfq compares device types and uses plain "cpu"
        self.device = torch.device("cpu") if state.device.type == "cpu" else state.device

    def barrier(self) -> None:
        self._state.wait_for_everyone()

    def all_reduce(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if not tensors:
            return []
        # One flat float64 buffer on the group's device: one collective, exact for integer counts below 2**53.
        flat = torch.cat([t.detach().reshape(-1).to(self.device, torch.float64) for t in tensors])
        total = self._reduce(flat, reduction="sum")
        out, start = [], 0
        for t in tensors:
            out.append(total[start:start + t.numel()].reshape(t.shape).to(t.device, t.dtype))
            start += t.numel()
        return out

    def all_gather(self, value: Any) -> list[Any]:
        return list(self._gather([value]))

    def broadcast(self, value: Any) -> Any:
        box = [value]
        self._broadcast(box, from_process=0)
        return box[0]


# ---- the current view ------------------------------------------------------------------------

_SINGLE = Distributed()
_group: Distributed | None = None
_lock = threading.Lock()
_thread_scope = threading.local()  # .depth: how many single_process() blocks this thread is in


def _timeout() -> timedelta:
    text = os.environ.get("HUB_DFQ_DIST_TIMEOUT", "")
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError as err:
        raise ConfigError(f"HUB_DFQ_DIST_TIMEOUT must be a number of seconds, got {text!r}") from err
    return timedelta(seconds=seconds)


def _create() -> Distributed:
    # why: accelerate costs a second to import and initialises the process group: only for launched runs
    from accelerate.state import PartialState

    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    created = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    if created:
        # why: torch.distributed.nn.functional (imported with torch._dynamo, so by timm and transformers) binds the
        # group that exists when it is first imported into its functions' default arguments, which then keep it
        # alive after destroy_process_group (below); imported before the group exists, those defaults are None
        importlib.import_module("torch.distributed.nn.functional")
    # cpu=True makes accelerate form a gloo group of CPU processes (its default is to expect one GPU per process)
    state = PartialState(cpu=use_cpu, timeout=_timeout())
    if created and torch.distributed.is_initialized():
        # why: a group still alive when the interpreter finalises has its gloo threads joined at module teardown,
        # while one of them may still be dropping a finished collective's tensors, which takes the GIL: Python
        # then ends that thread inside C++ and the process aborts after all its work was done ("terminate called
        # without an active exception", exit -6; about 1 run in 10 of the two-process tests). Destroying the
        # group at exit joins those threads while the interpreter is still whole.
        atexit.register(state.destroy_process_group)
    group = _AccelerateGroup(state)
    logger.info("hub-dfq runs as rank %d of %d on %s (%s)", group.rank, group.world_size, group.device,
                state.distributed_type)
    return group


def process_group() -> Distributed:
    """The process group this process belongs to (single-process unless launched; see :func:`single_process`)."""
    global _group
    if getattr(_thread_scope, "depth", 0):
        return _SINGLE
    if _group is None:
        with _lock:
            if _group is None:
                _group = _create() if launched() or _user_state_is_distributed() else _SINGLE
    return _group


def _user_state_is_distributed() -> bool:
    """Whether the caller's own script already set up accelerate with several processes."""
    state_module = sys.modules.get("accelerate.state")
    if state_module is None:
        return False
    shared = getattr(state_module.PartialState, "_shared_state", {})
    return bool(shared) and shared.get("num_processes", 1) > 1


@contextmanager
def single_process() -> Iterator[Distributed]:
    """Within this block :func:`process_group` is the single-process view (for work only this rank does)."""
    _thread_scope.depth = getattr(_thread_scope, "depth", 0) + 1
    try:
        yield _SINGLE
    finally:
        _thread_scope.depth -= 1


# why: the names before issue 20, still documented in earlier releases: kept for users' scripts (hub-dfq's own
# verbs reach the group through hub_dfq.runner.Runner)
current = process_group
local = single_process


def _flat(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ---- errors across ranks ---------------------------------------------------------------------

def _everywhere(err: BaseException) -> BaseException:
    """Mark an error that every rank raises (the CLI prints it once, from rank 0, and the ranks exit together)."""
    err.raised_on_every_rank = True
    return err


def _wait_for(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + float(os.environ.get("HUB_DFQ_FS_WAIT", _VISIBILITY_WAIT_S))
    while True:
        try:
            if condition():
                return True
        except OSError:  # a folder another machine cannot reach reads as "not there"
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
