"""Image priors for optimised inputs: smoothness, small norm, random jitter and flips."""

from __future__ import annotations

import math

import torch

__all__ = ["total_variation", "l2_prior", "jitter_flip", "clamp_", "cosine_lr"]


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of neighbouring pixels (both directions), averaged over the batch."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).square().mean()
    dw = (x[..., :, 1:] - x[..., :, :-1]).square().mean()
    return dh + dw


def l2_prior(x: torch.Tensor) -> torch.Tensor:
    """Mean squared input (in the normalised space)."""
    return x.square().mean()


def jitter_flip(x: torch.Tensor, *, jitter: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Randomly roll the batch by up to ``jitter`` pixels and flip it horizontally (one draw per step).

    Draws come from ``generator`` so a run is reproducible.
    """
    if jitter > 0:
        dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=generator).tolist()
        if dy or dx:
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if flip and bool(torch.randint(0, 2, (1,), generator=generator).item()):
        x = torch.flip(x, dims=(3,))
    return x


def clamp_(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Project ``x`` in place onto the per-channel box ``[low, high]`` (shapes ``(C, 1, 1)``)."""
    return x.clamp_(min=low, max=high)


def cosine_lr(step: int, total: int, *, base: float, warmup: float) -> float:
    """Linear warm-up over ``warmup * total`` steps, then a cosine decay to 2% of ``base``."""
    warm = int(round(warmup * total))
    if step < warm:
        return base * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return base * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * progress)))
