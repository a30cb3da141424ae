"""Fake-quantization on the integer grid: the values an integer implementation computes, in float.

Weights: one scale per output channel. A symmetric grid holds integers in ``[-(2^(b-1)-1), 2^(b-1)-1]`` (narrow
range, so zero is exact); an asymmetric one (below 8 bits) holds ``[low, low + 2^b - 1]`` with a per-channel
``low <= 0 <= low + 2^b - 1``: all ``2^b`` levels spread over the channel's own range, zero still exact, so the
integers are plain ``int8`` weights with zero point 0 for integer kernels. Activations: one scale per tensor and
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

from ..errors import DivergedError
from .integer import ActivationGrid
from .registry import WEIGHT_GRIDS

__all__ = [
    "round_ste",
    "weight_qrange",
    "weight_span",
    "asymmetric_at",
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


def weight_span(bits: int) -> int:
    """Integer steps between the ends of a ``bits``-bit asymmetric weight grid (``2^b - 1``)."""
    return 2**bits - 1


def asymmetric_at(grid: str, bits: int) -> bool:
    """Whether a ``grid`` weight quantizer is asymmetric at ``bits`` (8-bit weights are always symmetric: int8
    cannot hold an asymmetric 8-bit range)."""
    return grid == "asymmetric" and bits < 8


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


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a dense tensor in its own memory order (contiguous or channels-last), else a flat copy."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)
    return t.reshape(-1)


class _LearnedStepFakeQuant(torch.autograd.Function):
    """:func:`fake_quant` with the STE/LSQ gradients, in a handful of passes over the tensor.

    Autograd through the plain formula records a dozen element-wise ops and keeps their results; on a CPU
    that cost more than the convolutions of a reconstructed block. The values are :func:`fake_quant`'s
    (``clamp(r + zp, qmin, qmax) - zp`` is ``clamp(r, qmin - zp, qmax - zp)`` exactly). Gradients: to ``x``
    where ``round(x / s)`` lies in the grid (STE); to the step, LSQ's ``round(v) - v`` there and the clipped
    end outside, i.e. ``sum(grad * (out - x * passed)) / s``. ``keep`` (QDrop) marks values passed through
    unquantized: their gradient goes to ``x`` and none to the step.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point: int, qmin: int, qmax: int, keep):  # noqa: D102
        low, high = qmin - zero_point, qmax - zero_point
        out = torch.round(x / scale)
        blocked = (out < low).logical_or_(out > high)  # clipped: no gradient to x
        out.clamp_(low, high).mul_(scale)
        if keep is not None:
            out = torch.where(keep, x, out)
            blocked.logical_and_(keep.logical_not())
        ctx.save_for_backward(x, scale, out, blocked)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, scale, out, blocked = ctx.saved_tensors
        grad_x = grad.masked_fill(blocked, 0.0)
        grad_scale = None
        if ctx.needs_input_grad[1]:
            term = x.masked_fill(blocked, 0.0)
            torch.sub(out, term, out=term)
            grad_scale = (torch.dot(_flat(grad), _flat(term)) / scale).reshape(scale.shape)
        return grad_x, grad_scale, None, None, None, None


def _rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(alpha) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA, 0.0, 1.0)


class WeightQuantizer(nn.Module):
    """Per-output-channel weight quantizer.

    States: ``"nearest"`` rounding (STE when training), ``"adaround"`` learned rounding (soft while
    :attr:`soft` is set, hard otherwise), and frozen: :meth:`freeze` stores the integer weights
    (``weight_int``, int8) and every later forward returns ``weight_int * scale``.

    Args:
        bits: weight bit width.
        channels: output channels (one scale each).
        channel_dim: dimension of the output channels in the weight (0 for conv and linear).
        grid: ``"symmetric"`` or ``"asymmetric"`` (per-channel integer range ``[low, low + 2^b - 1]``, kept in the
            ``low`` buffer). 8-bit weights are always symmetric: int8 cannot hold an asymmetric 8-bit range.
    """

    def __init__(self, bits: int, channels: int, *, channel_dim: int = 0, grid: str = "symmetric"):
        super().__init__()
        if grid not in WEIGHT_GRIDS:
            raise ValueError(f"unknown weight grid {grid!r}: use one of {', '.join(WEIGHT_GRIDS)}")
        self.bits = bits
        self.channel_dim = channel_dim
        self.symmetric = not asymmetric_at(grid, bits)
        if self.symmetric:
            self.qmin, self.qmax = weight_qrange(bits)
            self.register_buffer("low", None)
        else:  # qmin/qmax: the envelope of every channel's range
            self.qmin, self.qmax = -weight_span(bits), weight_span(bits)
            self.register_buffer("low", torch.full((channels,), -(2 ** (bits - 1) - 1), dtype=torch.int8))
        self.scale = nn.Parameter(torch.ones(channels), requires_grad=False)
        self.register_buffer("weight_int", None)
        self.alpha: nn.Parameter | None = None
        # Where rounding starts, in steps (None: weight / scale). GPTQ sets it to its error-compensated
        # weights; a plain attribute, not state: it exists only between an algorithm and :meth:`freeze`.
        self.start: torch.Tensor | None = None
        self.soft = False
        self.enabled = True

    @property
    def grid(self) -> str:
        return "symmetric" if self.symmetric else "asymmetric"

    def bounds(self, like: torch.Tensor | None = None) -> tuple[torch.Tensor | int, torch.Tensor | int]:
        """Each channel's integer range: ints (symmetric), or ``(channels,)`` tensors shaped to broadcast against
        ``like`` (the weight, or anything with the output channels in :attr:`channel_dim`)."""
        if self.symmetric:
            return self.qmin, self.qmax
        low = self.low.to(torch.float32 if like is None else like.dtype)
        if like is not None:
            low = self._view(low, like)
        return low, low + weight_span(self.bits)

    def set_grid(self, scale: torch.Tensor, low: torch.Tensor | None = None) -> None:
        """Set the per-channel scales (and, on an asymmetric grid, each channel's lowest integer)."""
        self.set_scale(scale)
        if not self.symmetric:
            if low is None:
                raise ValueError("an asymmetric weight grid needs each channel's lowest integer (`low`)")
            low = low.detach().round().clamp(-weight_span(self.bits), 0)
            with torch.no_grad():
                self.low.copy_(low.reshape(self.low.shape).to(torch.int8))

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

    def set_start(self, start: torch.Tensor) -> None:
        """Round from ``start`` (in steps, the weight's shape) instead of ``weight / scale`` from now on."""
        self.start = start.detach().to(self.scale.device, torch.float32).clone()
        self.weight_int = None

    def _scaled(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight in steps, before rounding (the start point, if one is set)."""
        if self.start is not None:
            return self.start.to(weight.dtype)
        return weight.detach() / self._view(self.scale.detach(), weight)

    def init_adaround(self, weight: torch.Tensor, margin: float | None = None) -> None:
        """Start learned rounding at the fractional part of the weight in steps (the nearest-rounding point), or
        with ``margin``, ``margin`` away from nearest rounding's choice of the start (soft values already near the
        integers chosen, so a short fit only changes the roundings it must)."""
        scaled = self._scaled(weight)
        rest = scaled - torch.floor(scaled)
        if margin is not None:
            rest = torch.where(rest >= 0.5, 1.0 - margin, margin)
        rest = rest.clamp(1e-4, 1 - 1e-4)
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
        low, high = self.bounds(weight)
        if self.alpha is not None:
            floor = torch.floor(self._scaled(weight))
            up = _rectified_sigmoid(self.alpha) if self.soft else (self.alpha >= 0).to(weight.dtype)
            return torch.clamp(floor + up, low, high)
        if self.start is not None:
            return torch.clamp(torch.round(self.start.to(weight.dtype)), low, high)
        return torch.clamp(round_ste(weight / self._view(self.scale, weight)), low, high)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        return self.integer_weight(weight) * self._view(self.scale, weight)

    @torch.no_grad()
    def thaw(self, weight: nn.Parameter) -> None:
        """Undo :meth:`freeze` (or drop a rounding start point): set ``weight`` to the dequantized integers, so
        nearest rounding gives them back."""
        if self.frozen or self.start is not None:
            weight.copy_(self.integer_weight(weight) * self._view(self.scale, weight))
            self.weight_int = None
            self.start = None

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
        self.start = None

    def extra_repr(self) -> str:
        mode = "frozen" if self.frozen else "adaround" if self.alpha is not None else "nearest"
        return f"bits={self.bits}, channels={self.scale.numel()}, {self.grid}, {mode}"


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
            # why: finite but huge weights (3e38) overflow float32 in the forward pass; a bare FloatingPointError
            # was reported as an internal error
            raise DivergedError(f"activation range [{low}, {high}] is not finite: the model's activations overflow "
                                "float32 on the calibration images, so its weights (or the images) hold values far "
                                "outside what training produces; check the model, or download it again")
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
        keep = self._kept(x) if self.training and self.drop_prob > 0 else None
        if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
            return _LearnedStepFakeQuant.apply(x, scale, int(self.zero_point), self.qmin, self.qmax, keep)
        q = fake_quant(x, scale, self.zero_point, self.qmin, self.qmax, ste=False)
        return q if keep is None else torch.where(keep, x, q)

    def _kept(self, x: torch.Tensor) -> torch.Tensor:
        """QDrop's mask: each value kept unquantized with probability ``drop_prob`` (in 1/256 steps).

        Random bytes from 64-bit draws: a fifth of the cost of one float draw per value on a CPU.
        """
        words = torch.randint(-2**63, 2**63 - 1, ((x.numel() + 7) // 8,), dtype=torch.int64, device=x.device)
        threshold = round(self.drop_prob * 256)
        keep = words.view(torch.uint8)[:x.numel()] < threshold
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            n, c, h, w = x.shape  # the same layout as x, so the element-wise ops after stay fast
            return keep.view(n, h, w, c).permute(0, 3, 1, 2)
        return keep.view(x.shape)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, {'asymmetric' if self.signed else 'unsigned'}, mode={self.mode}"
