"""The one place where a verb meets the process group: partition the work, run shared steps on rank 0, merge.

A verb that can run over several processes is written as per-shard functions that know nothing of ranks
(they take the rows or shards they are given and return values) and one :class:`Runner` that decides who
does what:

- :meth:`Runner.shards` deals work items out over the processes (round robin), :meth:`Runner.rows` the rows
  of a dataset (whole blocks of batches, each row keeping its index);
- :meth:`Runner.every_rank` runs a per-shard function on every process and returns every result, in rank
  order, for the caller to merge;
- :meth:`Runner.main_only` runs a step on rank 0 alone (writing shared files, pushing) and returns its
  result on every rank; :meth:`Runner.hold_on_main` does so for a context manager (a lock held by rank 0);
- :meth:`Runner.check_same` and :meth:`Runner.check_shared_folder` refuse launches whose processes were
  given different arguments or do not share the output folder.

An error in any step reaches every process as data (:class:`~hub_dfq.errors.ErrorRecord`) and is raised
there as the same class, so no process waits for one that failed. In one process every method is a plain
call. Verbs take ``runner=None``, meaning ``Runner()``: the process group of the environment
(:func:`hub_dfq.distributed.process_group`).

Example:
    >>> runner = Runner()  # under `accelerate launch`, one of several processes
    >>> mine = runner.shards(range(10))  # rank r of N: items r, r + N, ...
    >>> made = runner.every_rank(lambda: [i * i for i in mine])  # every rank's list, in rank order
    >>> total = runner.main_only(lambda: sum(map(sum, made)))  # rank 0 computes (and would write); all get it
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Sequence, TypeVar

import torch

from .distributed import Distributed, process_group

if TYPE_CHECKING:
    from .data import ImageData

__all__ = ["Runner"]

T = TypeVar("T")


class Runner:
    """Partitions, merges and writes on rank 0 for a verb (see the module's docstring).

    Args:
        group: the process group (default: :func:`hub_dfq.distributed.process_group`, resolved when created).
    """

    def __init__(self, group: Distributed | None = None) -> None:
        self.group = process_group() if group is None else group

    def __repr__(self) -> str:
        return f"Runner(rank={self.rank}, world_size={self.world_size})"

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def world_size(self) -> int:
        return self.group.world_size

    @property
    def enabled(self) -> bool:
        """Whether there is more than one process."""
        return self.group.enabled

    @property
    def is_main(self) -> bool:
        """Whether this process is rank 0, the one that writes shared files."""
        return self.group.is_main

    def shards(self, items: Sequence[T]) -> list[T]:
        """This process's share of ``items``: round robin (items ``rank``, ``rank + world_size``, ...)."""
        return list(items[self.rank::self.world_size])

    def rows(self, data: ImageData, *, block: int) -> ImageData:
        """This process's part of a dataset: whole blocks of ``block`` rows, each row keeping its index (see
        :func:`hub_dfq.partition.rank_part`; all of ``data`` in one process)."""
        from .partition import rank_part  # why: it imports `datasets`, which a runner over shards never needs

        return rank_part(data, self.group, block=block)

    def every_rank(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> list[T]:
        """``fn(*args, **kwargs)`` on every process; every process's result in rank order, or every process
        raises the first failing rank's error once all are done."""
        return self.group.run_on_every_rank(functools.partial(fn, *args, **kwargs))

    def main_only(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on rank 0 alone (in a single-process view); its result, or its error, on every
        process. The result crosses processes: it must be picklable."""
        return self.group.run_on_main(functools.partial(fn, *args, **kwargs))

    def hold_on_main(self, stack: contextlib.ExitStack, manager: Callable[..., ContextManager[T]], *args: Any,
                     **kwargs: Any) -> T:
        """Enter ``manager(*args, **kwargs)`` on rank 0 alone, held until ``stack`` closes; what it yields on every
        process (e.g. a lock on the output folder that rank 0 holds for the whole run)."""
        return self.main_only(lambda: stack.enter_context(manager(*args, **kwargs)))

    def gather(self, value: T) -> list[T]:
        """``value`` of every process, in rank order."""
        return self.group.all_gather(value)

    def sum(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Element-wise sums of ``tensors`` over the processes (exact for integer counts below 2**53)."""
        return self.group.all_reduce(tensors)

    def check_same(self, what: str, /, **values: Any) -> None:
        """Refuse to go on (on every process, before anything is written) unless every process was given the same
        ``values`` (see :meth:`hub_dfq.distributed.Distributed.check_same`)."""
        self.group.check_same(what, values)

    def check_shared_folder(self, folder: str | Path, *, argument: str | None = None, what: str = "the folder",
                            hint: str = "") -> None:
        """Make sure every process sees the same ``folder`` (see
        :meth:`hub_dfq.distributed.Distributed.check_shared_folder`)."""
        self.group.check_shared_folder(Path(folder), argument=argument, what=what, hint=hint)
