"""Which weight files a folder holds, and reading pickle checkpoints without running their code."""

from __future__ import annotations

import pickle
from pathlib import Path

from ..errors import ModelNotFoundError, UnsafeCheckpointError

__all__ = ["weight_files", "check_weights_present", "unsafe_checkpoint_error"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".tar")


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def check_weights_present(folder: Path) -> None:
    if not weight_files(folder):
        raise ModelNotFoundError(
            f"{folder} has a config.json but no weights (model.safetensors, pytorch_model.bin, ...): "
            "copy the weights next to it, or use a Hub repo id"
        )


def unsafe_checkpoint_error(folder: Path, err: BaseException) -> UnsafeCheckpointError | None:
    """Translate the error ``torch.load(weights_only=True)`` raises on pickled code, else ``None``."""
    text = f"{type(err).__name__}: {err}"
    if isinstance(err, pickle.UnpicklingError) or "weights_only" in text or "Unsupported global" in text:
        return UnsafeCheckpointError(
            f"the checkpoint in {folder} stores pickled Python objects, which hub-dfq will not unpickle "
            "(it could run arbitrary code). Convert it to safetensors with a trusted tool, e.g. "
            "`safetensors.torch.save_file(model.state_dict(), 'model.safetensors')`"
        )
    return None
