"""Work budgets sized by what a model costs: written for the CIFAR ResNets, shrunk for larger models.

A preset's image and step counts (and synthesis's default steps) are chosen on models up to
:data:`REFERENCE_GFLOPS` per image. Each count shrinks by the cost ratio above it, so the time of a run grows
no faster than ``1 / ratio`` of what the written budget would take: EfficientNet-Lite0 at 224 px (0.77 GFLOP,
ratio 3.1) synthesises 64 images x 64 steps under ``fast`` instead of 256 x 200 (minutes, not an hour).
"""

from __future__ import annotations

__all__ = ["REFERENCE_GFLOPS", "cost_ratio", "shrink"]

# ResNet-44 at 32 px costs 0.19 GFLOP per image: every CIFAR ResNet keeps its budgets as written.
REFERENCE_GFLOPS = 0.25


def cost_ratio(gflops: float) -> float:
    """How many times a model's forward pass costs more than the reference (at least 1)."""
    return max(1.0, gflops / REFERENCE_GFLOPS)


def shrink(value: int, gflops: float, *, floor: int, multiple: int = 1) -> int:
    """``value`` divided by the cost ratio of a ``gflops`` model, rounded down to ``multiple``, at least ``floor``
    (and never more than ``value``)."""
    ratio = cost_ratio(gflops)
    if ratio == 1.0:
        return value
    return min(value, max(floor, int(value / ratio) // multiple * multiple))
