"""From pooled BN-input moments to numbers: per-layer divergences, aggregates, similarity, AUROC.

Conventions (also spelled out in ``audit.md``):

* per layer, a divergence is computed per channel between ``p = N(running_mean, running_var)``
  (what the model remembers) and ``q = N(mean, var)`` of the candidate's BN input, then averaged
  over channels; ``kl`` is the paper's ``KL(p || q)``, ``symmetric_kl`` the mean of both
  directions, ``w2`` the squared 2-Wasserstein distance;
* the aggregate ``divergence`` is the mean over BN layers (lower = closer);
* ``similarity = log(far / d) / log(far / near)``: 1 at the model's own BNS synthetic data
  ("near"), 0 at Gaussian noise ("far"), above 1 closer than the synthetic data, below 0 farther
  than noise; not clipped. With the noise reference alone (one-point normalisation) it is
  ``1 - d / far``: 0 at noise, 1 at a perfect match.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .moments import LayerMoments
from .registry import DIVERGENCES, divergence_fn

__all__ = ["METRICS", "layer_divergences", "aggregate", "bootstrap_ci", "similarity", "auroc"]

METRICS = DIVERGENCES  # kept name: the registry of divergences (kl, symmetric_kl, w2, ...)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else float("inf")


def layer_divergences(moments: Sequence[LayerMoments], running: Sequence[tuple[torch.Tensor, torch.Tensor]],
                      metric: str) -> list[float]:
    """Channel-averaged divergence ``metric`` of every layer (float64)."""
    fn = divergence_fn(metric)
    out = []
    for m, (mu_p, var_p) in zip(moments, running):
        value = fn(mu_p.double().cpu(), var_p.double().cpu(), m.mean, m.var).mean().item()
        out.append(_finite(value))
    return out


def aggregate(per_layer: Sequence[float]) -> float:
    """The model-level divergence: the mean over BN layers (comparable across depths)."""
    return _finite(float(sum(per_layer) / len(per_layer))) if per_layer else float("nan")


def bootstrap_ci(replicates: Sequence[tuple[torch.Tensor, torch.Tensor]] | None,
                 running: Sequence[tuple[torch.Tensor, torch.Tensor]], metric: str, *, estimate: float,
                 level: float = 0.95) -> tuple[float, float] | None:
    """Basic (reverse-percentile) bootstrap interval of the aggregate divergence, clamped at 0.

    A pooled divergence is biased upward by sampling noise in the moments, and a bootstrap replicate
    (Poisson weights: about half the effective sample size) more so, so plain percentiles sit above
    the estimate (for in-distribution data the estimate is their lower end). The basic interval
    ``(2 d - q_hi, 2 d - q_lo)`` corrects for that bias.

    Args:
        replicates: per layer ``(mean, var)`` with one row per replicate.
        running: per layer running ``(mean, var)``.
        metric: the divergence.
        estimate: the aggregate divergence of the data itself.
        level: coverage of the interval.

    Returns:
        ``(low, high)``, or ``None`` when fewer than 2 replicates exist.
    """
    if not replicates or replicates[0][0].shape[0] < 2:
        return None
    fn = divergence_fn(metric)
    per_layer = [fn(mu_p.double().cpu()[None], var_p.double().cpu()[None], mean, var).mean(-1)
                 for (mean, var), (mu_p, var_p) in zip(replicates, running)]
    agg = torch.stack(per_layer).mean(0)
    alpha = (1.0 - level) / 2.0
    low, high = torch.quantile(agg, torch.tensor([alpha, 1.0 - alpha], dtype=agg.dtype)).tolist()
    return _finite(max(2.0 * estimate - high, 0.0)), _finite(max(2.0 * estimate - low, 0.0))


def similarity(divergence: float, *, far: float | None, near: float | None) -> float | None:
    """Map a divergence onto the scale set by the two reference points.

    ``log(far / d) / log(far / near)`` with both references: 1 at ``near``, 0 at ``far``, linear in
    ``log d`` (divergences of shifted data spread over decades) and unclipped. With only ``far``
    (``near`` is ``None`` or not below ``far``), the one-point form ``1 - d / far``: 0 at noise, 1 at
    a perfect match. Returns ``None`` without a usable ``far`` reference.

    Example:
        >>> round(similarity(0.1, far=10.0, near=0.01), 3)
        0.667
    """
    if far is None or not far > 0 or not math.isfinite(far) or math.isnan(divergence):
        return None
    if near is not None and 0 < near < far:
        if divergence <= 0:
            return float("inf")
        if not math.isfinite(divergence):
            return float("-inf")
        return math.log(far / divergence) / math.log(far / near)
    return 1.0 - divergence / far


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
