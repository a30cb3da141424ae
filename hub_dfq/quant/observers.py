"""Range finders: which interval each quantizer covers.

Weights (per output channel, symmetric): ``minmax`` takes ``max|w|``; ``mse`` searches the clipping
ratio that minimises the squared rounding-plus-clipping error of each channel.
Activations (per tensor): an :class:`ActObserver` streams batches, keeps the running min/max and a
fixed-size random sample of values (seeded, so ranges are reproducible); ``minmax``,
``percentile`` and ``mse`` are computed from those.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .quantizers import act_qrange, fake_quant, weight_qrange

__all__ = ["weight_scale", "ActObserver", "activation_range"]

_GRID = 100  # clipping ratios tried by the MSE searches


def weight_scale(weight: torch.Tensor, bits: int, *, method: str = "mse", channel_dim: int = 0,
                 norm: float = 2.0) -> torch.Tensor:
    """Per-output-channel scale of a symmetric ``bits``-bit weight quantizer.

    Args:
        weight: the float weight.
        bits: weight bit width.
        method: ``"minmax"`` or ``"mse"``.
        channel_dim: output-channel dimension of ``weight``.
        norm: exponent of the error the ``"mse"`` search minimises (2 = squared error).

    Returns:
        A ``(channels,)`` tensor of scales.
    """
    w = weight.detach().float().transpose(0, channel_dim).reshape(weight.shape[channel_dim], -1)
    _, qmax = weight_qrange(bits)
    absmax = w.abs().amax(dim=1).clamp_min(1e-8)
    if method == "minmax":
        return absmax / qmax
    if method != "mse":
        raise ConfigError(f"unknown weight observer {method!r}: use 'minmax' or 'mse'")
    best_scale = absmax / qmax
    best_err = torch.full_like(absmax, float("inf"))
    for i in range(_GRID):
        ratio = 1.0 - i / (_GRID * 1.25)  # 1.0 down to 0.2
        scale = (absmax * ratio / qmax)[:, None]
        err = (fake_quant(w, scale, 0, -qmax, qmax, ste=False) - w).abs().pow(norm).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale[:, 0], best_scale)
    return best_scale


class ActObserver:
    """Streaming statistics of one activation tensor.

    Args:
        max_samples: values kept for the percentile and MSE searches (a uniform random subset of
            each batch, proportional to its size).
        seed: seed of the sub-sampling.
    """

    def __init__(self, *, max_samples: int = 1 << 18, seed: int = 0):
        self.max_samples = max_samples
        self.low = float("inf")
        self.high = float("-inf")
        self.samples: list[torch.Tensor] = []
        self.seen = 0
        self.generator = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(-1).cpu()
        if flat.numel() == 0:
            return
        self.low = min(self.low, float(flat.min()))
        self.high = max(self.high, float(flat.max()))
        self.seen += flat.numel()
        # Keep at most max_samples / 8 per batch, so the first batches do not crowd out later ones.
        take = min(flat.numel(), max(1, self.max_samples // 8))
        index = torch.randint(flat.numel(), (take,), generator=self.generator)
        self.samples.append(flat[index])
        kept = sum(s.numel() for s in self.samples)
        while kept > self.max_samples and len(self.samples) > 1:
            # Thin every stored chunk by half: an unbiased subsample of everything seen so far.
            self.samples = [s[::2] for s in self.samples]
            kept = sum(s.numel() for s in self.samples)

    @property
    def empty(self) -> bool:
        return self.seen == 0

    def values(self) -> torch.Tensor:
        return torch.cat(self.samples) if self.samples else torch.zeros(0)


def activation_range(observer: ActObserver, bits: int, *, signed: bool, method: str = "mse",
                     percentile: float = 99.99) -> tuple[float, float]:
    """The ``(low, high)`` interval a ``bits``-bit activation quantizer should cover.

    Raises:
        ConfigError: unknown method.
        ValueError: the observer saw no values.
    """
    if observer.empty:
        raise ValueError("observer saw no values (was the layer ever reached during calibration?)")
    low, high = min(observer.low, 0.0), max(observer.high, 0.0)
    if not signed:
        low = 0.0
    if method == "minmax":
        return low, high
    values = observer.values()
    if method == "percentile":
        q = torch.tensor([(100.0 - percentile) / 100.0, percentile / 100.0])
        lo, hi = torch.quantile(values[: 1 << 24], q).tolist()
        return (min(lo, 0.0) if signed else 0.0), max(hi, 0.0)
    if method != "mse":
        raise ConfigError(f"unknown activation observer {method!r}: use 'minmax', 'percentile' or 'mse'")
    qmin, qmax = act_qrange(bits)
    best, best_err = (low, high), float("inf")
    for i in range(_GRID):
        ratio = 1.0 - i / (_GRID * 1.25)
        lo, hi = low * ratio, high * ratio
        scale = max((hi - lo) / (qmax - qmin), 1e-8)
        zp = min(max(round(-lo / scale), qmin), qmax) if signed else 0
        err = float((fake_quant(values, torch.tensor(scale), zp, qmin, qmax, ste=False) - values).square().sum())
        if err < best_err:
            best, best_err = (lo, hi), err
    return best
