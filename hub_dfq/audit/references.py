"""Reference points on the model's own scale: its BNS synthetic data ("near") and Gaussian noise ("far").

A raw divergence means little on its own (it depends on depth, width and the data's resolution),
so every audit measures two inputs on the same model: Gaussian noise in the model's normalised
input space, which ignores everything the BN layers remember, and synthetic images optimised to
match the BN statistics (the paper's BNS data), which is as close as data-free inputs get.

The near reference comes from ``hub_dfq.synth.synthesize(model, "bns", ...)`` when that module is
installed; otherwise from a small BNS optimisation here (same loss: the Gaussian KL between running
and batch statistics at every BN input). Both are cached per model under :func:`cache_dir`, keyed
by a hash of the BN buffers, the preprocessing and the settings, so repeated audits are fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from ..bnstats import batch_moments, capture_bn_inputs, gaussian_kl

logger = logging.getLogger(__name__)

__all__ = ["cache_dir", "reference_key", "gaussian_batches", "bns_batches", "synth_near_dataset",
           "load_cached", "store_cached", "REFERENCE_VERSION"]

# Bump when what a reference measures changes, so stale cache entries are ignored.
REFERENCE_VERSION = 1


def cache_dir() -> Path:
    """Where reference scores are cached.

    ``$HUB_DFQ_CACHE/audit`` if set, else ``$HF_HOME/hub_dfq/audit``, else
    ``$XDG_CACHE_HOME/hub_dfq/audit``, else ``~/.cache/hub_dfq/audit``.
    """
    if os.environ.get("HUB_DFQ_CACHE"):
        return Path(os.environ["HUB_DFQ_CACHE"]).expanduser() / "audit"
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub_dfq" / "audit"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "hub_dfq" / "audit"


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


def _lr(step: int, total: int, base: float, warmup: float = 0.05) -> float:
    """Linear warm-up, then cosine decay to 2% of ``base`` (the schedule hub_dfq.synth uses)."""
    warm = int(round(warmup * total))
    if step < warm:
        return base * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return base * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def bns_batches(model, *, n: int, batch_size: int, steps: int, seed: int, lr: float = 1.0) -> Iterator[torch.Tensor]:
    """The fallback near reference: inputs optimised to match the BN statistics (paper's BNS loss).

    Each batch starts from seeded Gaussian noise and runs ``steps`` Adam steps on the mean over BN
    layers of ``KL(N(running) || N(batch))``, projected to the valid pixel range after each step.
    """
    layers = model.bn_layers
    device = model.device
    low, high = (t.to(device) for t in model.preprocess.valid_range())
    running = [(bn.running_mean.detach().float(), bn.running_var.detach().float()) for _, bn in layers]
    gen = torch.Generator().manual_seed(seed)
    done = 0
    params = [p for p in model.module.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)  # only the inputs are optimised
        while done < n:
            size = min(batch_size, n - done)
            x = torch.randn(size, *model.input_size, generator=gen).to(device).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr)
            with capture_bn_inputs(layers) as slots:
                for step in range(steps):
                    for group in opt.param_groups:
                        group["lr"] = _lr(step, steps, lr)
                    opt.zero_grad(set_to_none=True)
                    model.module(x)
                    loss = torch.stack([gaussian_kl(mu, var, *batch_moments(s)).mean()
                                        for s, (mu, var) in zip(slots, running)]).mean()
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        x.copy_(torch.maximum(torch.minimum(x, high), low))
            logger.debug("fallback BNS batch: final loss %.4g", loss.item())
            yield x.detach()
            done += size
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def synth_near_dataset(model, *, n: int, seed: int, steps: int, progress: bool = False) -> Any:
    """``n`` BNS images from ``hub_dfq.synth.synthesize`` (cached by that module), as a ``datasets.Dataset``."""
    from ..synth import synthesize

    return synthesize(model, "bns", n=n, iters=steps, seed=seed, out_dir=None, progress=progress)
