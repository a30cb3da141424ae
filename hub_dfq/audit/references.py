"""Reference points on the model's own scale: its BNS synthetic data ("near") and Gaussian noise ("far").

A raw divergence means little on its own (it depends on depth, width and the data's resolution),
so every audit measures two inputs on the same model: Gaussian noise in the model's normalised
input space, which ignores everything the BN layers remember, and synthetic images optimised to
match the BN statistics (the paper's BNS data), which is as close as data-free inputs get.

The near reference comes from ``hub_dfq.synth.synthesize(model, "bns", ...)`` (the one BNS
implementation, shared with synthesis). Both points are cached per model under :func:`cache_dir`,
keyed by a hash of the BN buffers, the preprocessing and the settings, so repeated audits are fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from ..cache import cache_root

logger = logging.getLogger(__name__)

__all__ = ["cache_dir", "reference_key", "gaussian_batches", "synth_near_dataset",
           "load_cached", "store_cached", "REFERENCE_VERSION"]

# Bump when what a reference measures changes, so stale cache entries are ignored.
REFERENCE_VERSION = 1


def cache_dir() -> Path:
    """Where reference scores are cached (see :func:`hub_dfq.cache.cache_root`)."""
    return cache_root("audit")


def reference_key(layers, preprocess, settings: dict[str, Any]) -> str:
    """Hash of the BN buffers (names, running mean/var), the preprocessing and ``settings``."""
    h = hashlib.sha256()
    for name, bn in layers:
        h.update(name.encode())
        for buf in (bn.running_mean, bn.running_var):
            h.update(buf.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    payload = {"input_size": list(preprocess.input_size), "mean": list(preprocess.mean), "std": list(preprocess.std),
               "version": REFERENCE_VERSION, **settings}
    h.update(json.dumps(payload, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def load_cached(key: str) -> dict[str, Any] | None:
    path = cache_dir() / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:  # a corrupted entry is recomputed, not fatal
        logger.warning("ignoring unreadable audit cache entry %s: %s", path, err)
        return None


def store_cached(key: str, value: dict[str, Any]) -> None:
    path = cache_dir() / f"{key}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(value))
        tmp.replace(path)  # atomic, so concurrent audits never read half an entry
    except OSError as err:  # a read-only cache only costs time
        logger.warning("could not cache audit reference in %s: %s", path, err)


def gaussian_batches(input_size: tuple[int, ...], *, n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """``n`` images of standard normal noise in the model's normalised input space, seeded."""
    gen = torch.Generator().manual_seed(seed)
    done = 0
    while done < n:
        size = min(batch_size, n - done)
        yield torch.randn(size, *input_size, generator=gen)
        done += size


def synth_near_dataset(model, *, n: int, seed: int, steps: int, progress: bool = False) -> Any:
    """``n`` BNS images from ``hub_dfq.synth.synthesize`` (cached by that module), as a ``datasets.Dataset``."""
    from ..synth import synthesize

    return synthesize(model, "bns", n=n, iters=steps, seed=seed, out_dir=None, progress=progress)
