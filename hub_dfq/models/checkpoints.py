"""Which weight files a folder holds, reading pickle checkpoints without running their code, and saying why
a weights file cannot be loaded (corrupted, truncated, or not the weights of this architecture)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Sequence

from safetensors import SafetensorError

from ..errors import CheckpointError, ModelNotFoundError, UnsafeCheckpointError

__all__ = ["weight_files", "check_weights_present", "unsafe_checkpoint_error", "weights_error", "mismatch_error"]

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


_UNREADABLE = ("PytorchStreamReader", "failed finding central directory", "invalid load key", "unexpected EOF",
               "Ran out of input", "deserializ")


def mismatch_error(folder: Path, *, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
                   mismatched: Sequence[str] = ()) -> CheckpointError:
    """The error for weights whose names or shapes do not fit the architecture in ``folder``'s config."""
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", mismatched)):
        if keys:
            parts.append(f"{len(keys)} {what} (e.g. {', '.join(list(keys)[:2])})")
    return CheckpointError(f"the weights in {folder} do not fit the architecture its config.json describes: "
                           f"{'; '.join(parts)}. Check that the weights and config.json belong together, or save "
                           "the model again")


def weights_error(folder: Path, err: BaseException) -> CheckpointError | None:
    """Translate what a library raises on a damaged or mismatched weights file, else ``None`` (a real bug)."""
    text = str(err)
    if isinstance(err, SafetensorError) or (isinstance(err, (RuntimeError, EOFError, ValueError))
                                            and any(marker in text for marker in _UNREADABLE)):
        first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
        return CheckpointError(f"the weights file in {folder} is corrupted or truncated ({first}): download or copy "
                               "it again")
    if isinstance(err, RuntimeError) and "state_dict" in text:  # torch's load_state_dict report
        lines = text.splitlines()
        missing = [k for line in lines if "Missing key(s)" in line for k in re.findall(r'"([^"]+)"', line)]
        unexpected = [k for line in lines if "Unexpected key(s)" in line for k in re.findall(r'"([^"]+)"', line)]
        mismatched = re.findall(r"size mismatch for ([^:]+):", text)
        return mismatch_error(folder, missing=missing, unexpected=unexpected, mismatched=mismatched)
    return None
