"""Fake-quantization on the integer grid: the values an integer implementation computes, in float.

Weights: symmetric, one scale per output channel, integers in ``[-(2^(b-1)-1), 2^(b-1)-1]``
(narrow range, so the grid is symmetric and zero is exact). Activations: one scale per tensor and
an integer zero point, integers in ``[0, 2^b - 1]`` (zero point 0 for unsigned tensors after a
ReLU). Dequantized values are ``(q - zero_point) * scale`` computed in float32, exactly what an
integer graph's DequantizeLinear returns. Rounding is round-half-to-even, as in ONNX.

Training uses the straight-through estimator (STE) for rounding, which with a learnable scale
gives the learned-step-size (LSQ, Esser et al. 2020) gradients; AdaRound (Nagel et al. 2020)
learns whether each weight rounds up or down.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from .integer import ActivationGrid

__all__ = [
    "round_ste",
    "weight_qrange",
    "act_qrange",
    "fake_quant",
    "WeightQuantizer",
    "ActQuantizer",
    "ADAROUND_ZETA",
    "ADAROUND_GAMMA",
]

ADAROUND_ZETA, ADAROUND_GAMMA = 1.1, -0.1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity gradient in the backward pass."""
    return (torch.round(x) - x).detach() + x


def weight_qrange(bits: int) -> tuple[int, int]:
    """Integer range of a ``bits``-bit symmetric narrow-range weight."""
    qmax = 2 ** (bits - 1) - 1
    return -qmax, qmax


def act_qrange(bits: int) -> tuple[int, int]:
    """Integer range of a ``bits``-bit activation (unsigned storage with a zero point)."""
    return 0, 2**bits - 1


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int, qmin: int, qmax: int,
               *, ste: bool = True) -> torch.Tensor:
    """``(clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``.

    With ``ste`` the rounding passes gradients straight through (to ``x`` inside the clamp range and
    to ``scale`` as in LSQ); without it, values are bit-identical and no graph is recorded.
    """
    rounded = round_ste(x / scale) if ste else torch.round(x / scale)
    return (torch.clamp(rounded + zero_point, qmin, qmax) - zero_point) * scale


def _rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(alpha) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA, 0.0, 1.0)


class WeightQuantizer(nn.Module):
    """Per-output-channel symmetric weight quantizer.

    States: ``"nearest"`` rounding (STE when training), ``"adaround"`` learned rounding (soft while
    :attr:`soft` is set, hard otherwise), and frozen: :meth:`freeze` stores the integer weights
    (``weight_int``, int8) and every later forward returns ``weight_int * scale``.

    Args:
        bits: weight bit width.
        channels: output channels (one scale each).
        channel_dim: dimension of the output channels in the weight (0 for conv and linear).
    """

    def __init__(self, bits: int, channels: int, *, channel_dim: int = 0):
        super().__init__()
        self.bits = bits
        self.channel_dim = channel_dim
        self.qmin, self.qmax = weight_qrange(bits)
        self.scale = nn.Parameter(torch.ones(channels), requires_grad=False)
        self.register_buffer("weight_int", None)
        self.alpha: nn.Parameter | None = None
        self.soft = False
        self.enabled = True

    def _view(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        shape = [1] * like.dim()
        shape[self.channel_dim] = -1
        return t.view(shape)

    @property
    def frozen(self) -> bool:
        return self.weight_int is not None

    def set_scale(self, scale: torch.Tensor) -> None:
        """Set the per-channel scales (clamped away from zero so dead channels stay finite)."""
        with torch.no_grad():
            self.scale.copy_(scale.detach().clamp_min(1e-8))

    def init_adaround(self, weight: torch.Tensor) -> None:
        """Start learned rounding at the fractional part of ``weight / scale`` (the nearest-rounding point)."""
        scaled = weight.detach() / self._view(self.scale.detach(), weight)
        rest = (scaled - torch.floor(scaled)).clamp(1e-4, 1 - 1e-4)
        alpha = -torch.log((ADAROUND_ZETA - ADAROUND_GAMMA) / (rest - ADAROUND_GAMMA) - 1.0)
        self.alpha = nn.Parameter(alpha)
        self.weight_int = None

    def rounding_regulariser(self, beta: float) -> torch.Tensor:
        """AdaRound's ``sum(1 - |2 h(alpha) - 1|^beta)``: pushes every soft rounding to 0 or 1."""
        if self.alpha is None:
            return torch.zeros(())
        return (1.0 - (2.0 * _rectified_sigmoid(self.alpha) - 1.0).abs().pow(beta)).sum()

    def integer_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The integers (as float) the weight maps to; differentiable when soft or training."""
        if self.frozen:
            return self.weight_int.to(weight.dtype)
        scale = self._view(self.scale, weight)
        if self.alpha is not None:
            floor = torch.floor(weight.detach() / scale.detach())
            up = _rectified_sigmoid(self.alpha) if self.soft else (self.alpha >= 0).to(weight.dtype)
            return torch.clamp(floor + up, self.qmin, self.qmax)
        return torch.clamp(round_ste(weight / scale), self.qmin, self.qmax)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        return self.integer_weight(weight) * self._view(self.scale, weight)

    @torch.no_grad()
    def thaw(self, weight: nn.Parameter) -> None:
        """Undo :meth:`freeze`: set ``weight`` to the dequantized integers, so nearest rounding gives them back."""
        if self.frozen:
            weight.copy_(self.weight_int.to(weight.dtype) * self._view(self.scale, weight))
            self.weight_int = None

    @torch.no_grad()
    def freeze(self, weight: torch.Tensor) -> None:
        """Fix the integer weights (hard rounding) in ``weight_int``; drop the rounding parameters.

        A frozen quantizer stays as it is: recomputing from the float weight would round to nearest
        and silently discard learned (AdaRound) rounding.
        """
        if self.frozen:
            return
        soft, self.soft = self.soft, False
        self.weight_int = self.integer_weight(weight).round().to(torch.int8)
        self.soft = soft
        self.alpha = None

    def extra_repr(self) -> str:
        mode = "frozen" if self.frozen else "adaround" if self.alpha is not None else "nearest"
        return f"bits={self.bits}, channels={self.scale.numel()}, {mode}"


@functools.lru_cache(maxsize=None)  # why: called after every optimiser step, for a handful of (bound, qmax) pairs
def largest_step(bound: float, qmax: int) -> float:
    """The largest float32 step whose grid ``[0, qmax * step]``, computed in float32, stays within ``bound``."""
    step = torch.tensor(bound / qmax, dtype=torch.float32)
    while float(step * qmax) > bound:  # float32 rounding can land one ulp above the bound
        step = torch.nextafter(step, torch.zeros_like(step))
    return float(step)


class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer with an integer zero point.

    Modes: ``"observe"`` passes values through and feeds the observer, ``"quant"`` fake-quantizes,
    ``"off"`` passes through. ``drop_prob`` > 0 keeps a random fraction of the values in full
    precision while training (QDrop, Wei et al. 2022), which flattens the loss landscape during
    reconstruction; it has no effect in eval mode.

    Args:
        bits: activation bit width.
        signed: ``True`` for tensors that can be negative (asymmetric range, zero point), ``False``
            after a ReLU (zero point fixed at 0).

    ``upper_bound`` (set by :func:`~hub_dfq.quant.prepare.prepare` after a ReLU6 or a Hardtanh) is the largest
    value the quantized tensor can hold; a learned step size is kept within it (:meth:`project_`).
    """

    def __init__(self, bits: int, *, signed: bool):
        super().__init__()
        self.bits = bits
        self.signed = signed
        self.qmin, self.qmax = act_qrange(bits)
        self.scale = nn.Parameter(torch.tensor(1.0), requires_grad=False)
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.mode = "quant"
        self.observer = None
        self.observer_method = "mse"
        self.percentile = 99.99
        self.drop_prob = 0.0
        self.calibrated = False
        self.upper_bound: float | None = None

    @torch.no_grad()
    def project_(self) -> None:
        """Shrink a learned step size whose grid reaches past ``upper_bound`` (unsigned quantizers only).

        Grid points above the bound can never be used, and ONNX Runtime drops the activation's ``Clip``
        (so the layer runs as one integer kernel) only when the grid stays inside it.
        """
        if self.upper_bound is None or self.signed:
            return
        limit = largest_step(self.upper_bound, self.qmax)
        self.scale.copy_(torch.where(self.scale.abs() > limit, torch.full_like(self.scale, limit), self.scale))

    @torch.no_grad()
    def set_range(self, low: float, high: float) -> None:
        """Scale and zero point covering ``[low, high]`` (widened to contain 0, so 0 is exact)."""
        low, high = min(float(low), 0.0), max(float(high), 0.0)
        if not self.signed:
            low = 0.0
        if not math.isfinite(low) or not math.isfinite(high):
            raise FloatingPointError(f"activation range [{low}, {high}] is not finite")
        scale = max((high - low) / (self.qmax - self.qmin), 1e-8)
        zero_point = 0 if not self.signed else int(min(max(round(-low / scale), self.qmin), self.qmax))
        self.scale.fill_(scale)
        self.zero_point.fill_(zero_point)
        self.calibrated = True

    def grid(self, name: str) -> ActivationGrid:
        """This quantizer's integer grid (see :class:`~hub_dfq.quant.integer.ActivationGrid`)."""
        return ActivationGrid(name=name, scale=float(self.scale.detach().abs().clamp_min(1e-8)),
                              zero_point=int(self.zero_point), qmin=self.qmin, qmax=self.qmax, bits=self.bits,
                              signed=self.signed)

    def range(self) -> tuple[float, float]:
        """The represented ``(low, high)`` interval."""
        scale, zp = float(self.scale), int(self.zero_point)
        return (self.qmin - zp) * scale, (self.qmax - zp) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "observe":
            if self.observer is not None:
                self.observer.update(x.detach())
            return x
        scale = self.scale.abs().clamp_min(1e-8)
        q = fake_quant(x, scale, self.zero_point, self.qmin, self.qmax, ste=self.training or torch.is_grad_enabled())
        if self.training and self.drop_prob > 0:
            keep = torch.rand_like(x) < self.drop_prob
            q = torch.where(keep, x, q)
        return q

    def extra_repr(self) -> str:
        return f"bits={self.bits}, {'asymmetric' if self.signed else 'unsigned'}, mode={self.mode}"
