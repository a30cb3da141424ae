"""Saved progress of long quantization runs, so an interrupted run continues where it stopped.

Block reconstruction saves the quantizer state after every block, distillation every few dozen
steps, together with the random generators' states, under ``$HUB_DFQ_CACHE/quantize/<key>``. The
key is :func:`hub_dfq.fingerprint.fingerprint` of everything that determines the result (the float
weights, the quantization config, the algorithm, its version and settings, the calibration tensor,
the seed, the device type), so a rerun of the same command picks the saved state up and finishes
with the same bytes as an uninterrupted run; any other run starts fresh. :func:`hub_dfq.quantize`
deletes the state once the model is complete. A run holds the lock of its state folder
(:mod:`hub_dfq.locks`): the same run started twice at once is refused with the other's pid, never mixed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..cache import cache_root, record_entry, record_path
from ..fingerprint import fingerprint
from ..locks import hold
from ..outputs import temp_path
from ..runner import Runner
from .modules import quant_layers

logger = logging.getLogger(__name__)

__all__ = ["RunState", "load_quantizer_state", "quantizer_state"]


class RunState:
    """The saved stages of one run (``"reconstruct"``, ``"distill"``) in one cache folder.

    Args:
        folder: where the stages are kept.
        runner: the processes that share the run: rank 0 reads and writes the state, every rank gets what it read
            (default: :class:`~hub_dfq.runner.Runner` over the process group of the environment when used).
    """

    def __init__(self, folder: Path, *, runner: Runner | None = None):
        self.folder = Path(folder)
        self._runner = runner

    @property
    def runner(self) -> Runner:
        return Runner() if self._runner is None else self._runner

    @classmethod
    def for_run(cls, *, version: int, runner: Runner | None = None, **parts: Any) -> "RunState":
        """The state folder of the run that ``parts`` determine (see :func:`hub_dfq.fingerprint.fingerprint`)."""
        return cls(cache_root("quantize") / fingerprint("quantize", version=version, **parts), runner=runner)

    @contextlib.contextmanager
    def locked(self) -> Iterator["RunState"]:
        """Hold this run's lock while it reads and saves its state.

        Raises:
            OutputLockedError: another process runs the same quantization right now.
        """
        with hold(self.folder, what="saved progress of this quantization run"):
            yield self

    def _file(self, stage: str) -> Path:
        return self.folder / f"{stage}.pt"

    def load(self, stage: str) -> dict[str, Any] | None:
        """The saved state of ``stage``, or ``None`` (nothing saved, or a file that cannot be read).

        In a multi-process run rank 0 reads it and every rank gets rank 0's, so all resume alike.
        """
        return self.runner.main_only(self._read, stage)

    def _read(self, stage: str) -> dict[str, Any] | None:
        path = self._file(stage)
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch's safe unpickler raises anything on a torn file
            # a torn or foreign file of our own cache: say so and start the stage again rather than fail
            logger.warning("ignoring unreadable saved progress %s (%s: %s); starting this stage again", path,
                           type(err).__name__, err)
            return None

    def save(self, stage: str, state: dict[str, Any]) -> None:
        """Write ``state`` atomically: an interruption leaves the previous state, never half a file.

        A failed save (disk full) is logged and the run goes on: it only loses the chance to resume. In a
        multi-process run only rank 0 writes (every rank holds the same state).
        """
        if not self.runner.is_main:
            return
        path = self._file(stage)
        partial = temp_path(path)  # per process: a concurrent run never removes ours
        try:
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            record_entry("quantize", self.folder)  # first: `hub-dfq cache clear` deletes only what it has a record of
            self.folder.mkdir(exist_ok=True)
            torch.save(state, partial)
            os.replace(partial, path)
        except (OSError, RuntimeError) as err:  # torch reports a failed write (disk full) as RuntimeError
            logger.warning("could not save the progress of %s in %s (%s): an interruption will start this stage "
                           "again", stage, self.folder, err)
        finally:
            try:
                partial.unlink(missing_ok=True)
            except OSError as err:
                logger.warning("could not remove %s: %s", partial, err)

    def clear(self) -> None:
        """Delete the saved stages (rank 0 only, in a multi-process run)."""
        if self.runner.is_main:
            shutil.rmtree(self.folder, ignore_errors=True)
            record_path(self.folder).unlink(missing_ok=True)


def quantizer_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Everything a fitted quantized module holds (including frozen integer weights), detached."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def load_quantizer_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`quantizer_state`; frozen integer weights are restored as frozen."""
    for name, layer in quant_layers(module):
        key = f"{name}.weight_quantizer.weight_int"
        layer.weight_quantizer.alpha = None
        layer.weight_quantizer.weight_int = state[key].clone() if key in state else None
    module.load_state_dict(state, strict=True)
