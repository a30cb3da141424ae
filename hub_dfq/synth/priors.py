"""Image priors for optimised inputs: the noise they start from, smoothness, small norm, random jitter and flips."""

from __future__ import annotations

import math

import torch

__all__ = ["total_variation", "l2_prior", "jitter_flip", "clamp_", "cosine_lr", "white_noise", "pink_noise", "NOISES"]

# Photographs' amplitude spectra fall about as 1/f to 1/f^1.2 (Field 1987; van der Schaaf & van Hateren 1996), and
# resizing and JPEG make them steeper; their colour channels are strongly correlated (0.8-0.95 in RGB).
PINK_EXPONENT = 1.25
PINK_COLOUR_CORRELATION = 0.8


def white_noise(shape: tuple[int, ...], *, generator: torch.Generator) -> torch.Tensor:
    """Independent N(0, 1) values: the paper's Gaussian start."""
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def pink_noise(shape: tuple[int, ...], *, generator: torch.Generator, exponent: float = PINK_EXPONENT,
               colour_correlation: float = PINK_COLOUR_CORRELATION) -> torch.Tensor:
    """Noise with a photograph's second-order statistics and none of its content: unit variance per image and channel.

    Each channel is Gaussian noise whose amplitude spectrum falls as ``1 / f**exponent`` (neighbouring pixels
    correlated as in photographs, where white noise has none), and the channels share a common field so that any two
    correlate at ``colour_correlation``. Shape ``(N, C, H, W)``.
    """
    n, c, h, w = shape
    fy = torch.fft.fftfreq(h).abs()[:, None]
    fx = torch.fft.rfftfreq(w)[None, :]
    freq = torch.sqrt(fy.square() + fx.square())
    freq[0, 0] = 1.0 / max(h, w)  # the mean's weight: that of the lowest frequency present
    spectrum = torch.complex(torch.randn((n, c + 1, h, w // 2 + 1), generator=generator),
                             torch.randn((n, c + 1, h, w // 2 + 1), generator=generator))
    fields = torch.fft.irfft2(spectrum * freq.pow(-exponent), s=(h, w))
    fields = (fields - fields.mean((2, 3), keepdim=True)) / fields.std((2, 3), keepdim=True)
    shared = fields[:, :1] if c > 1 else torch.zeros_like(fields[:, :1])
    rho = colour_correlation if c > 1 else 0.0
    x = math.sqrt(rho) * shared + math.sqrt(1.0 - rho) * fields[:, 1:]
    return (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True)


# the noise an optimisation starts from, by the name SynthConfig's regularizers give it
NOISES = {"white": white_noise, "pink": pink_noise}


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
