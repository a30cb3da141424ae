"""What the optimiser of a synthesis run moves: the pixels themselves, or a decorrelated image.

Adam takes steps of about the same size in every coordinate it optimises. Over pixels those steps are white
noise: every spatial frequency and every colour direction moves as much as any other, while photographs hold
most of their energy at low frequencies and in the common (grey) direction of the colour channels. BN-matched
images made that way keep too little large-scale structure and too little colour correlation (docs/imagenet.md,
"A photograph's spectrum"). Optimising instead the Fourier coefficients of the image, scaled by ``1 / f``, and
colour channels mixed to correlate as in photographs (the decorrelated parameterisation of feature
visualisation, Olah et al. 2017) makes each step's change photograph-like; the BN loss still decides which
images come out.
"""

from __future__ import annotations

import torch

from .priors import PINK_COLOUR_CORRELATION
from .registry import PARAMETERISATIONS

__all__ = ["PixelParameterisation", "DecorrelatedParameterisation", "PARAMETERISATIONS",
           "parameterisation_for"]

# amplitude falls as 1 / f**DECORRELATED_EXPONENT: a photograph's (docs: 1/f to 1/f^1.2 before resizing)
DECORRELATED_EXPONENT = 1.0


class PixelParameterisation:
    """The optimiser moves the pixels (normalised inputs) directly: the paper's methods, and the base class."""

    def to_params(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images ``(N, C, H, W)`` -> the tensor the optimiser moves."""
        return x

    def to_images(self, params: torch.Tensor) -> torch.Tensor:
        """The optimised tensor -> normalised images (differentiable)."""
        return params

    def project(self, params: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> None:
        """Clamp the images ``params`` stand for into ``[low, high]``, in place (the projected gradient step)."""
        params.clamp_(min=low, max=high)


class DecorrelatedParameterisation(PixelParameterisation):
    """Fourier coefficients scaled by ``1 / f**exponent`` and colour channels correlated at ``colour_correlation``.

    ``to_images`` is linear and invertible (for the real-image part of the coefficients), so a clamp in pixel
    space maps back exactly. The scale is normalised to a root mean square of 1 over the coefficients, so a step
    of Adam's learning rate changes the image about as much as a step over pixels (1.6 times the energy: a
    complex coefficient is two coordinates).

    Args:
        shape: ``(C, H, W)`` of one image.
        exponent: how fast the step's amplitude falls with frequency.
        colour_correlation: correlation of any two colour channels in a step (three-channel images only).
    """

    def __init__(self, shape: tuple[int, ...], *, exponent: float = DECORRELATED_EXPONENT,
                 colour_correlation: float = PINK_COLOUR_CORRELATION, device: torch.device | None = None):
        channels, height, width = shape
        self.size = (height, width)
        fy = torch.fft.fftfreq(height).abs()[:, None]
        fx = torch.fft.rfftfreq(width)[None, :]
        freq = torch.sqrt(fy.square() + fx.square()).clamp(min=1.0 / max(height, width))
        scale = freq.pow(-exponent)
        self.scale = (scale / scale.square().mean().sqrt()).to(device)
        self.mix = self.unmix = None
        if channels == 3:
            correlation = torch.full((3, 3), colour_correlation, dtype=torch.float64)
            correlation.fill_diagonal_(1.0)
            values, vectors = torch.linalg.eigh(correlation)
            # symmetric square roots: no channel is privileged
            self.mix = ((vectors * values.sqrt()) @ vectors.T).float().to(device)
            self.unmix = ((vectors / values.sqrt()) @ vectors.T).float().to(device)

    @staticmethod
    def _colours(x: torch.Tensor, matrix: torch.Tensor | None) -> torch.Tensor:
        return x if matrix is None else torch.einsum("cd,nd...->nc...", matrix, x)

    def to_params(self, x: torch.Tensor) -> torch.Tensor:
        spectrum = torch.fft.rfft2(self._colours(x.float(), self.unmix), norm="ortho") / self.scale
        return torch.view_as_real(spectrum).contiguous()

    def to_images(self, params: torch.Tensor) -> torch.Tensor:
        fields = torch.fft.irfft2(torch.view_as_complex(params) * self.scale, s=self.size, norm="ortho")
        return self._colours(fields, self.mix)

    def project(self, params: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> None:
        params.copy_(self.to_params(torch.maximum(torch.minimum(self.to_images(params), high), low)))


def parameterisation_for(name: str, shape: tuple[int, ...],
                         device: torch.device | None = None) -> PixelParameterisation:
    """The parameterisation registered as ``name`` for images of ``shape`` ``(C, H, W)``."""
    if name == "pixels":
        return PixelParameterisation()
    if name == "decorrelated":
        if len(shape) != 3:
            raise ValueError(f"the decorrelated parameterisation needs (C, H, W) images, got {shape}")
        return DecorrelatedParameterisation(shape, device=device)
    raise ValueError(f"unknown parameterisation {name!r}; known: {', '.join(PARAMETERISATIONS)}")
