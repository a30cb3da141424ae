"""From pooled BN-input moments to numbers: per-layer divergences, aggregates, similarity, AUROC.

Conventions (also spelled out in ``audit.md``):

* per layer, a divergence is computed per channel between ``p = N(running_mean, running_var)``
  (what the model remembers) and ``q = N(mean, var)`` of the candidate's BN input, then averaged
  over channels; ``kl`` is the paper's ``KL(p || q)``, ``symmetric_kl`` the mean of both
  directions, ``w2`` the squared 2-Wasserstein distance;
* the aggregate ``divergence`` is the geometric mean over BN layers (lower = closer): layer
  divergences span decades, and an arithmetic mean let three stride-2 depthwise layers of
  EfficientNet-Lite0 carry most of the score (and rank JPEG-compressed images above the originals);
* the ``divergence`` of a candidate is bias-corrected per layer with its bootstrap (see
  :func:`bootstrap_estimate`); ``divergence_plugin`` is the raw pooled value;
* ``similarity = log(far / d) / log(far / near)``: 1 at the model's own BNS synthetic data
  ("near"), 0 at Gaussian noise ("far"), above 1 closer than the synthetic data, below 0 farther
  than noise; not clipped. With the noise reference alone (one-point normalisation) it is
  ``log10(far / d) / 3``: 0 at noise, 1 three decades below it (where clean real data lands).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence

import torch

from .registry import DIVERGENCES, divergence_fn

__all__ = ["METRICS", "SPAN_DECADES", "LayerMoments", "BootstrapEstimate", "layer_divergences", "aggregate",
           "bootstrap_estimate", "aggregate_layers", "similarity", "auroc", "MAX_CORRECTION"]

METRICS = DIVERGENCES  # kept name: the registry of divergences (kl, symmetric_kl, w2, ...)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else float("inf")


@dataclass
class LayerMoments:
    """Pooled moments of one BN input: ``count`` values per channel, float64 ``sum`` and ``sumsq``.

    Made by :class:`~hub_dfq.audit.moments.MomentAccumulator` (which also exports it), defined here where they
    become numbers: the accumulator scores batches with :func:`aggregate_layers` as it goes.
    """

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


def layer_divergences(moments: Sequence[LayerMoments], running: Sequence[tuple[torch.Tensor, torch.Tensor]],
                      metric: str) -> list[float]:
    """Channel-averaged divergence ``metric`` of every layer (float64)."""
    fn = divergence_fn(metric)
    out = []
    for m, (mu_p, var_p) in zip(moments, running):
        value = fn(mu_p.double().cpu(), var_p.double().cpu(), m.mean, m.var).mean().item()
        out.append(_finite(value))
    return out


# Floor of a layer divergence inside the geometric mean: a layer that matches exactly must not send it to 0.
LAYER_FLOOR = 1e-12


def aggregate_layers(per_layer: torch.Tensor) -> torch.Tensor:
    """Geometric mean over the first dimension (layers) of float64 divergences, each floored at ``LAYER_FLOOR``.

    Every layer weighs the same in log space: one layer 100x off moves the aggregate as much as any
    other, however large its raw value. An infinite layer makes the aggregate infinite.
    """
    return per_layer.clamp_min(LAYER_FLOOR).log().mean(0).exp()


def aggregate(per_layer: Sequence[float]) -> float:
    """The model-level divergence: the geometric mean over BN layers (comparable across depths)."""
    if not per_layer:
        return float("nan")
    return _finite(aggregate_layers(torch.tensor(list(per_layer), dtype=torch.float64)).item())


@dataclass(frozen=True)
class BootstrapEstimate:
    """The bias-corrected divergence and its interval (see :func:`bootstrap_estimate`)."""

    estimate: float
    ci: tuple[float, float]
    plugin: float
    replicates: int


# A layer's bias correction may remove at most this share of its plug-in divergence: where a layer's true
# divergence is ~0 its plug-in value is all sampling noise, and 2 d - d* would go to 0 or below.
MAX_CORRECTION = 0.75


def bootstrap_estimate(replicates: Sequence[tuple[torch.Tensor, torch.Tensor]] | None,
                       running: Sequence[tuple[torch.Tensor, torch.Tensor]], metric: str, *,
                       plugin_layers: Sequence[float], level: float = 0.95) -> BootstrapEstimate | None:
    """Bias-corrected divergence and its interval: a basic bootstrap per layer, aggregated per replicate.

    A layer's pooled ("plug-in") divergence ``d`` is biased upward by sampling noise in the moments,
    additively (about the same amount whatever the layer's true divergence: on EfficientNet-Lite0 at
    224 px the aggregate is +30% at 50 images, +10% at 100), and a bootstrap replicate ``d*``
    (Poisson weights per image, the same effective size) is biased about as much again. So per layer
    the plausible true values are ``t = 2 d - d*`` (the basic bootstrap), floored at
    ``(1 - MAX_CORRECTION) d``, and each replicate's ``t`` is aggregated over layers like the
    divergence itself (:func:`aggregate_layers`):

    * estimate: the aggregate of ``max(2 d - mean(d*), (1 - MAX_CORRECTION) d)``;
    * interval: ``estimate * exp(+-z * sd(log t))``, ``z`` the normal quantile of ``level``: symmetric in
      log space around the estimate, never at or below 0.

    Coverage of the population value, measured by resampling a 250-image population of real ImageNet
    images on Lite0 (``scripts/bench_audit_imagenet.py``): 0.895-0.93 for a 90% interval and 0.935-0.97
    for a 95% one at 50-200 images. The quantiles of the aggregated ``t`` themselves under-covered as the
    sample grew (0.85 / 0.875 at 200 images): the geometric mean of noisy replicates sits below the
    estimate (Jensen), so those intervals were shifted down. (An interval on the aggregate alone, in log
    space, under-covered too: 0.72-0.86 at 90%, because the bias is additive per layer, not proportional to
    the aggregate.)

    Args:
        replicates: per layer ``(mean, var)`` with one row per replicate.
        running: per layer running ``(mean, var)``.
        metric: the divergence.
        plugin_layers: per layer, the divergence of the pooled moments of the data itself.
        level: coverage of the interval.

    Returns:
        The estimate, or ``None`` when fewer than 2 usable replicates exist or a plug-in layer
        divergence is not finite (then the plug-in value is all there is).
    """
    if not replicates or replicates[0][0].shape[0] < 2:
        return None
    d = torch.tensor(list(plugin_layers), dtype=torch.float64)[:, None]
    if not bool(torch.isfinite(d).all()):
        return None
    fn = divergence_fn(metric)
    d_star = torch.stack([fn(mu_p.double().cpu()[None], var_p.double().cpu()[None], mean, var).mean(-1)
                          for (mean, var), (mu_p, var_p) in zip(replicates, running)])  # (layers, replicates)
    d_star = d_star[:, torch.isfinite(d_star).all(0)]
    if d_star.shape[1] < 2:
        return None
    floor = (1.0 - MAX_CORRECTION) * d
    plausible = aggregate_layers(torch.maximum(2.0 * d - d_star, floor))
    estimate = aggregate_layers(torch.maximum(2.0 * d - d_star.mean(1, keepdim=True), floor)).item()
    spread = NormalDist().inv_cdf((1.0 + level) / 2.0) * float(plausible.log().std())
    low, high = estimate * math.exp(-spread), estimate * math.exp(spread)
    return BootstrapEstimate(estimate=_finite(estimate), ci=(low, high),
                             plugin=aggregate([float(v) for v in d[:, 0]]), replicates=int(d_star.shape[1]))


# One-point scale: 1 means this many decades (powers of ten) closer than Gaussian noise. Clean real data sits
# 2.5-3.0 decades below noise on both shipped checks: EfficientNet-Lite0 at 224 px, 200 ImageNet images: 2.5
# (similarity 0.84); CIFAR-10 ResNet-20, 200 / 2000 test images: 2.6 / 3.0.
SPAN_DECADES = 3.0


def similarity(divergence: float, *, far: float | None, near: float | None) -> float | None:
    """Map a divergence onto the scale set by the reference points (linear in ``log d``, unclipped).

    * Both references: ``log(far / d) / log(far / near)``: 1 at ``near`` (the model's BNS
      synthetic data), 0 at ``far`` (Gaussian noise).
    * Only ``far`` (``near`` is ``None`` or not below ``far``): ``log10(far / d) / SPAN_DECADES``:
      0 at noise, 1 at a divergence a thousand times below noise (clean real data lands at
      0.84-1.0); each decade of divergence is a third of the scale. (The former ``1 - d / far`` read
      0.76-0.999 for everything from clean images to heavy blur: noise is decades away.)

    Negative means farther than noise. Returns ``None`` without a usable ``far`` reference.

    Example:
        >>> round(similarity(0.1, far=10.0, near=0.01), 3)
        0.667
        >>> round(similarity(0.01, far=10.0, near=None), 3)
        1.0
    """
    if far is None or not far > 0 or not math.isfinite(far) or math.isnan(divergence):
        return None
    if divergence <= 0:
        return float("inf")
    if not math.isfinite(divergence):
        return float("-inf")
    if near is not None and 0 < near < far:
        return math.log(far / divergence) / math.log(far / near)
    return math.log10(far / divergence) / SPAN_DECADES


def auroc(negatives: Sequence[float], positives: Sequence[float]) -> float:
    """Probability that a random positive scores higher than a random negative (ties count half).

    With batch-level divergences, ``negatives`` are clean batches and ``positives`` shifted ones.
    """
    if not negatives or not positives:
        return float("nan")
    neg = torch.tensor(list(negatives), dtype=torch.float64)
    pos = torch.tensor(list(positives), dtype=torch.float64)
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return ((greater + 0.5 * ties) / (len(neg) * len(pos))).item()
