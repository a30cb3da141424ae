"""Reference points on the model's own scale: its BNS synthetic data ("near") and Gaussian noise ("far").

A raw divergence means little on its own (it depends on depth, width and the data's resolution),
so every audit measures two inputs on the same model: Gaussian noise in the model's normalised
input space, which ignores everything the BN layers remember, and synthetic images optimised to
match the BN statistics (the paper's BNS data), which is as close as data-free inputs get.

The near reference comes from ``hub_dfq.synth.api.synthesize(model, "bns", ...)`` (the one BNS
implementation, shared with synthesis). Both points are cached per model under
:func:`reference_cache_dir`, keyed on :func:`hub_dfq.fingerprint.fingerprint` of the weights, the
preprocessing, the settings and the versions of the algorithms that made them, so repeated audits are
fast and a changed algorithm never reuses an old point.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

import torch

from ..cache import cache_root, record_entry
from ..fingerprint import fingerprint, weights_sha256
from ..outputs import write_text
from ..runtime import resolve_precision
from ..synth.api import run_identity, synthesize
from ..synth.config import SynthConfig
from .config import NEAR_BUDGET_GMACS

logger = logging.getLogger(__name__)

__all__ = ["reference_cache_dir", "reference_key", "gaussian_batches", "synth_near_dataset", "entry_path",
           "load_cached", "store_cached", "REFERENCE_VERSION", "NEAR_BUDGET_GMACS", "macs_per_image", "near_cost_gmacs"]

# Bump when what a reference measures changes (the synthesis of the near point has its own versions).
REFERENCE_VERSION = 4  # 4: bootstrap over images, bias-corrected divergence (3: score batches by row index)


def reference_cache_dir() -> Path:
    """Where reference scores are cached (see :func:`hub_dfq.cache.cache_root`)."""
    return cache_root("audit")




def near_config(*, n: int, seed: int, iters: int, device) -> SynthConfig:
    """The synthesis run of the near reference on ``device`` (its precision is the one used there)."""
    return SynthConfig(method="bns", num_images=n, iters=iters, seed=seed, precision=resolve_precision("auto", device))


def reference_key(model, settings: dict[str, Any]) -> str:
    """Cache key of a reference point of ``model`` measured with ``settings``."""
    near = settings.get("kind") == "near"
    synth = run_identity(model, near_config(n=settings["n"], seed=settings["seed"], iters=settings["steps"],
                                            device=model.device)) if near else None
    preprocess = model.preprocess
    return fingerprint("audit-reference", version=REFERENCE_VERSION, length=32,
                       weights=weights_sha256(model.module), preprocess=[list(preprocess.input_size),
                                                                        list(preprocess.mean), list(preprocess.std)],
                       settings=settings, synthesis=synth)


def entry_path(key: str) -> Path:
    """The cache file of a reference point."""
    return reference_cache_dir() / f"{key}.json"


def load_cached(key: str) -> dict[str, Any] | None:
    """The cached reference point ``key``, or ``None`` (absent, or unreadable: then it is measured again)."""
    path = entry_path(key)
    try:
        entry = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:  # a corrupted entry is recomputed, not fatal
        logger.warning("ignoring unreadable audit cache entry %s: %s", path, err)
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("divergence"), (int, float)):
        logger.warning("ignoring audit cache entry %s: it is not a reference point", path)
        return None
    return entry


def store_cached(key: str, value: dict[str, Any]) -> None:
    """Write a reference point atomically (a reader never sees half an entry); a failure only costs time later."""
    path = entry_path(key)
    try:
        record_entry("audit", path)  # first: `hub-dfq cache clear` deletes only what it has a record of
        write_text(path, json.dumps(value))
    except OSError as err:  # a read-only or full cache only costs time
        logger.warning("could not cache audit reference in %s: %s", path, err)


def macs_per_image(model) -> int:
    """Multiply-accumulates of one forward pass at the model's input size (:meth:`VisionModel.gflops` / 2)."""
    return round(model.gflops() * 1e9 / 2)


def near_cost_gmacs(model, *, n: int, iters: int) -> float:
    """Estimated cost of synthesising the near reference: a forward and a backward pass (~3x) per step."""
    return 3.0 * n * iters * macs_per_image(model) / 1e9


def gaussian_batches(input_size: tuple[int, ...], *, n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """``n`` images of standard normal noise in the model's normalised input space, seeded."""
    gen = torch.Generator().manual_seed(seed)
    done = 0
    while done < n:
        size = min(batch_size, n - done)
        yield torch.randn(size, *input_size, generator=gen)
        done += size


def synth_near_dataset(model, *, n: int, seed: int, steps: int, progress: bool | None = None) -> Any:
    """``n`` BNS images from :func:`hub_dfq.synth.api.synthesize` (cached by that module), as a ``datasets.Dataset``."""
    config = near_config(n=n, seed=seed, iters=steps, device=model.device)
    return synthesize(model, config.method, config.num_images, iters=config.iters, seed=config.seed, out_dir=None,
                      precision=config.precision, progress=progress)
