"""Streaming moments of every BatchNorm input over a dataset, with batch-level scores on the fly.

One forward pre-hook per BN layer reduces its input to per-image, per-channel float32 sums of ``x``
and ``x**2`` (one cheap pass over the activation, no host sync); after each forward pass those are
converted to float64 once and added to accumulators that stay on the model's device. Images are
grouped into fixed-size *score batches* (64 by default, independent of the forward batch size):
each full score batch gets its own divergence (the batch-level score distribution), and each score
batch is also a resampling unit of an online Poisson bootstrap, so the confidence interval needs
no second pass and no per-image storage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..bnstats import running_moments
from .registry import divergence_fn

__all__ = ["LayerMoments", "MomentAccumulator"]

BNLayers = Sequence[tuple[str, nn.Module]]


@dataclass
class LayerMoments:
    """Pooled moments of one BN input: ``count`` values per channel, float64 ``sum`` and ``sumsq``."""

    name: str
    count: int
    sum: torch.Tensor
    sumsq: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    @property
    def var(self) -> torch.Tensor:
        """Biased variance, as BatchNorm computes it."""
        return (self.sumsq / max(self.count, 1) - self.mean.square()).clamp_min(0.0)


def _per_image_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, C)`` float32 sums of ``x`` and ``x**2`` over every dimension but batch and channel."""
    x = x.detach()
    if x.dim() == 2:
        x = x.unsqueeze(-1)
    flat = x.reshape(x.shape[0], x.shape[1], -1).float()
    # ||x||^2 is one fused reduction (~2x faster than x.square().sum() and no temporary tensor).
    return flat.sum(-1), torch.linalg.vector_norm(flat, dim=-1).square()


class MomentAccumulator:
    """Accumulate BN-input moments of everything forwarded inside ``with acc:``.

    Args:
        layers: ``(name, bn)`` pairs, each with running statistics.
        device: where the accumulators live (the model's device).
        score_batch: images per batch-level score and per bootstrap unit.
        metric: divergence of the batch-level scores (see :mod:`hub_dfq.audit.registry`).
        bootstrap: number of Poisson-bootstrap replicates (0 disables the interval).
        seed: seed of the bootstrap weights.

    Call :meth:`step` after every forward pass (it consumes what the hooks captured).
    """

    def __init__(self, layers: BNLayers, *, device: torch.device, score_batch: int = 64, metric: str = "kl",
                 bootstrap: int = 200, seed: int = 0) -> None:
        self.layers = list(layers)
        self.device = device
        self.score_batch = int(score_batch)
        self.metric = divergence_fn(metric)
        self.bootstrap = int(bootstrap)
        self.running = running_moments(self.layers, device=device)
        widths = [bn.running_mean.numel() for _, bn in self.layers]
        f64 = dict(dtype=torch.float64, device=device)
        self.sum = [torch.zeros(c, **f64) for c in widths]
        self.sumsq = [torch.zeros(c, **f64) for c in widths]
        self.values_per_image = [0] * len(widths)  # spatial size of each BN input
        self.n_images = 0
        self._captured: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(widths)
        self._pending: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in widths]
        self._pending_images = 0
        self._batch_scores: list[torch.Tensor] = []
        # Poisson bootstrap: replicate r weighs score batch b by w_rb ~ Poisson(1).
        self._gen = torch.Generator(device="cpu").manual_seed(seed)
        self._boot_sum = [torch.zeros(self.bootstrap, c, **f64) for c in widths]
        self._boot_sumsq = [torch.zeros(self.bootstrap, c, **f64) for c in widths]
        self._boot_images = torch.zeros(self.bootstrap, **f64)
        self._handles: list = []

    # ---- hooks ----------------------------------------------------------------------------------
    def _hook(self, i: int) -> Callable:
        def hook(_module, args):
            x = args[0]
            self.values_per_image[i] = x[0, 0].numel() if x.dim() > 2 else 1
            self._captured[i] = _per_image_sums(x)

        return hook

    def __enter__(self) -> "MomentAccumulator":
        self._handles = [bn.register_forward_pre_hook(self._hook(i)) for i, (_, bn) in enumerate(self.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ---- accumulation ---------------------------------------------------------------------------
    def step(self) -> None:
        """Fold the sums captured by the last forward pass into the accumulators."""
        if any(c is None for c in self._captured):
            missing = [self.layers[i][0] for i, c in enumerate(self._captured) if c is None]
            raise RuntimeError(f"BN layers {missing} were not called by the forward pass")
        n = self._captured[0][0].shape[0]
        for i, (s, q) in enumerate(self._captured):
            s, q = s.to(torch.float64), q.to(torch.float64)
            self.sum[i] += s.sum(0)
            self.sumsq[i] += q.sum(0)
            self._pending[i].append((s, q))
        self._captured = [None] * len(self.layers)
        self.n_images += n
        self._pending_images += n
        while self._pending_images >= self.score_batch:
            self._flush(self.score_batch)

    def _flush(self, size: int) -> None:
        """Close one score batch made of the first ``size`` pending images."""
        weights = None
        if self.bootstrap:
            weights = torch.poisson(torch.ones(self.bootstrap), generator=self._gen).to(self.device, torch.float64)
            self._boot_images += weights * size
        scores = []
        for i in range(len(self.layers)):
            s = torch.cat([p[0] for p in self._pending[i]])
            q = torch.cat([p[1] for p in self._pending[i]])
            bs, bq = s[:size].sum(0), q[:size].sum(0)
            self._pending[i] = [(s[size:], q[size:])] if s.shape[0] > size else []
            if weights is not None:
                self._boot_sum[i] += weights[:, None] * bs
                self._boot_sumsq[i] += weights[:, None] * bq
            if size == self.score_batch:
                count = size * self.values_per_image[i]
                mean = bs / count
                var = (bq / count - mean.square()).clamp_min(0.0)
                scores.append(self.metric(*self.running[i], mean, var).mean())
        self._pending_images -= size
        if scores:
            self._batch_scores.append(torch.stack(scores).mean())

    def finish(self) -> None:
        """Close the last, partial score batch (it counts in the bootstrap, not as a batch-level score)."""
        if self._pending_images:
            self._flush(self._pending_images)

    # ---- results --------------------------------------------------------------------------------
    def moments(self) -> list[LayerMoments]:
        """Pooled moments per layer (float64, on the CPU)."""
        return [LayerMoments(name, self.n_images * self.values_per_image[i], self.sum[i].cpu(), self.sumsq[i].cpu())
                for i, (name, _) in enumerate(self.layers)]

    def batch_scores(self) -> list[float]:
        """Divergence of each full score batch alone, in data order."""
        return torch.stack(self._batch_scores).cpu().tolist() if self._batch_scores else []

    def bootstrap_moments(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per layer ``(mean, var)`` of shape ``(replicates, C)``; replicates that drew no image are dropped."""
        if not self.bootstrap or self.n_images == 0:
            return None
        keep = self._boot_images > 0
        out = []
        for i in range(len(self.layers)):
            count = (self._boot_images[keep] * self.values_per_image[i])[:, None]
            mean = self._boot_sum[i][keep] / count
            var = (self._boot_sumsq[i][keep] / count - mean.square()).clamp_min(0.0)
            out.append((mean.cpu(), var.cpu()))
        return out
