"""Saved progress of long quantization runs, so an interrupted run continues where it stopped.

Block reconstruction saves the quantizer state after every block, distillation every few dozen
steps, together with the random generators' states, under ``$HUB_DFQ_CACHE/quantize/<key>``. The
key is :func:`hub_dfq.fingerprint.fingerprint` of everything that determines the result (the float
weights, the quantization config, the algorithm, its version and settings, the calibration tensor,
the seed, the device type), so a rerun of the same command picks the saved state up and finishes
with the same bytes as an uninterrupted run; any other run starts fresh. :func:`hub_dfq.quantize`
deletes the state once the model is complete.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..cache import cache_root
from ..distributed import current
from ..fingerprint import fingerprint
from .modules import quant_layers

logger = logging.getLogger(__name__)

__all__ = ["RunState", "load_quantizer_state", "quantizer_state"]


class RunState:
    """The saved stages of one run (``"reconstruct"``, ``"distill"``) in one cache folder.

    Args:
        folder: where the stages are kept.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @classmethod
    def for_run(cls, *, version: int, **parts: Any) -> "RunState":
        """The state folder of the run that ``parts`` determine (see :func:`hub_dfq.fingerprint.fingerprint`)."""
        return cls(cache_root("quantize") / fingerprint("quantize", version=version, **parts))

    def _file(self, stage: str) -> Path:
        return self.folder / f"{stage}.pt"

    def load(self, stage: str) -> dict[str, Any] | None:
        """The saved state of ``stage``, or ``None`` (nothing saved, or a file that cannot be read).

        In a multi-process run rank 0 reads it and every rank gets rank 0's, so all resume alike.
        """
        return current().run_on_main(lambda: self._read(stage))

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

        In a multi-process run only rank 0 writes (every rank holds the same state).
        """
        if not current().is_main:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._file(stage)
        partial = path.with_name(path.name + ".partial")
        torch.save(state, partial)
        os.replace(partial, path)

    def clear(self) -> None:
        """Delete the saved stages (rank 0 only, in a multi-process run)."""
        if current().is_main:
            shutil.rmtree(self.folder, ignore_errors=True)


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
