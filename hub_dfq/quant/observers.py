"""Range finders: which interval each quantizer covers.

Weights (per output channel): ``minmax`` takes ``max|w|``; ``mse`` searches the clipping ratio that minimises the
squared rounding-plus-clipping error of each channel. On an asymmetric grid (:func:`weight_grid`) both clip the
channel's ``[min, max]`` (with ``min <= 0 <= max``) by one ratio: 1 for ``minmax``, searched for ``mse``; a
registered observer gives its own (``Observer.grid_fn``).
Activations (per tensor): an :class:`ActObserver` streams batches, keeps the running min/max and a
fixed-size random sample of values (seeded, so ranges are reproducible); ``minmax``,
``percentile`` and ``mse`` are computed from those. An activation observer may bring its own collector
(``Observer.collector``: a histogram, say); :func:`new_collector` makes the one a quantizer's observer reads.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..registry import resolve
from .quantizers import act_qrange, fake_quant, weight_qrange, weight_span
from .registry import ACT_OBSERVERS, WEIGHT_OBSERVERS

__all__ = ["weight_scale", "weight_grid", "asymmetric_grid", "minmax_weight_grid", "mse_weight_grid", "ActObserver",
           "new_collector", "activation_range",
           "minmax_weight_scale", "mse_weight_scale", "minmax_range", "percentile_range", "mse_range"]

_GRID = 100  # clipping ratios tried by the MSE searches


def weight_scale(weight: torch.Tensor, bits: int, *, method: str = "mse", channel_dim: int = 0) -> torch.Tensor:
    """Per-output-channel scale of a symmetric ``bits``-bit weight quantizer.

    Args:
        weight: the float weight.
        bits: weight bit width.
        method: a registered weight observer (``"minmax"``, ``"mse"``).
        channel_dim: output-channel dimension of ``weight``.

    Returns:
        A ``(channels,)`` tensor of scales.
    """
    fn = resolve(WEIGHT_OBSERVERS.get(method).fn)
    w = weight.detach().float().transpose(0, channel_dim).reshape(weight.shape[channel_dim], -1)
    return fn(w, bits)


def weight_grid(weight: torch.Tensor, bits: int, *, method: str = "mse", channel_dim: int = 0,
                symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-output-channel scales of a ``bits``-bit weight grid, and on an asymmetric grid each channel's lowest
    integer (``None`` when symmetric): what :meth:`~hub_dfq.quant.quantizers.WeightQuantizer.set_grid` takes."""
    if symmetric:
        return weight_scale(weight, bits, method=method, channel_dim=channel_dim), None
    observer = WEIGHT_OBSERVERS.get(method)
    w = weight.detach().float().transpose(0, channel_dim).reshape(weight.shape[channel_dim], -1)
    scale, low = resolve(observer.grid_fn or mse_weight_grid)(w, bits)
    scale, low = torch.as_tensor(scale, dtype=torch.float32), torch.as_tensor(low, dtype=torch.float32)
    span = weight_span(bits)
    rows = (w.shape[0],)
    # why: a wrong grid from a plugin would only show as integers the checkpoint loader refuses, minutes later
    if scale.shape != rows or low.shape != rows or not bool((scale > 0).all()) or not bool(scale.isfinite().all()) \
            or not bool(((low <= 0) & (low >= -span) & (low == low.round())).all()):
        raise ConfigError(f"weight observer {method!r} returned an invalid asymmetric {bits}-bit grid: give one "
                          f"positive finite scale and one integer low in [-{span}, 0] per output channel "
                          f"({rows[0]} channels)")
    return scale, low


def minmax_weight_grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The asymmetric grid over each row's ``[min(w, 0), max(w, 0)]``, unclipped."""
    return asymmetric_grid(w, bits, search=False)


def mse_weight_grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipping of each row's ``[min(w, 0), max(w, 0)]`` with the least squared rounding error."""
    return asymmetric_grid(w, bits)


def asymmetric_grid(w: torch.Tensor, bits: int, *, search: bool = True,
                    importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``w`` (``(..., rows, K)``), the step and lowest integer of a ``bits``-bit asymmetric grid over the
    row's ``[min(w, 0), max(w, 0)]``, clipped by the ratio (1 down to 0.2) that minimises ``sum_k importance_k (w_k
    - q(w_k))^2`` (``importance``: ``(..., K)``, default ones; GPTQ passes its Hessian's diagonal).

    Returns:
        ``(scale, low)``, both shaped like ``w`` without its last dimension (``low`` as float integers).
    """
    span = weight_span(bits)
    w_low, w_high = w.amin(dim=-1).clamp(max=0.0), w.amax(dim=-1).clamp(min=0.0)
    weight = torch.ones_like(w[..., :1, :]) if importance is None else importance.unsqueeze(-2)
    best_scale = best_low = best_err = None
    for i in range(_GRID if search else 1):
        ratio = 1.0 - i / (_GRID * 1.25)
        scale = (ratio * (w_high - w_low) / span).clamp_min(1e-8)
        low = torch.round(ratio * w_low / scale).clamp(-span, 0)
        q = torch.clamp(torch.round(w / scale[..., None]), low[..., None], (low + span)[..., None])
        err = ((w - q * scale[..., None]).square() * weight).sum(dim=-1)
        if best_err is None:
            best_scale, best_low, best_err = scale, low, err
            continue
        better = err < best_err
        best_scale = torch.where(better, scale, best_scale)
        best_low = torch.where(better, low, best_low)
        best_err = torch.where(better, err, best_err)
    return best_scale, best_low


def minmax_weight_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``max |w| / qmax`` per row of ``w`` (one row per output channel)."""
    _, qmax = weight_qrange(bits)
    return w.abs().amax(dim=1).clamp_min(1e-8) / qmax


def mse_weight_scale(w: torch.Tensor, bits: int, norm: float = 2.0) -> torch.Tensor:
    """The clipping of ``max |w|`` per row that minimises ``sum |fake_quant(w) - w|^norm``."""
    _, qmax = weight_qrange(bits)
    absmax = w.abs().amax(dim=1).clamp_min(1e-8)
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


def new_collector(method: str, *, seed: int = 0):
    """What the activation observer ``method`` collects its statistics in: its ``collector``, by default an
    :class:`ActObserver` (seeded value sampling).

    Raises:
        ConfigError: unknown method.
    """
    factory = ACT_OBSERVERS.get(method).collector
    return resolve(factory)(seed=seed) if factory is not None else ActObserver(seed=seed)


def activation_range(observer: ActObserver, bits: int, *, signed: bool, method: str = "mse",
                     percentile: float = 99.99) -> tuple[float, float]:
    """The ``(low, high)`` interval a ``bits``-bit activation quantizer should cover.

    Raises:
        ConfigError: unknown method.
        ValueError: the observer saw no values.
    """
    fn = resolve(ACT_OBSERVERS.get(method).fn)
    if observer.empty:
        raise ValueError("observer saw no values (was the layer ever reached during calibration?)")
    return fn(observer, bits, signed=signed, percentile=percentile)


def _observed(observer: ActObserver, signed: bool) -> tuple[float, float]:
    low, high = min(observer.low, 0.0), max(observer.high, 0.0)
    return (low if signed else 0.0), high


def minmax_range(observer: ActObserver, bits: int, *, signed: bool, percentile: float = 99.99) -> tuple[float, float]:
    """The observed minimum and maximum (widened to contain 0)."""
    return _observed(observer, signed)


def percentile_range(observer: ActObserver, bits: int, *, signed: bool,
                     percentile: float = 99.99) -> tuple[float, float]:
    """The ``percentile`` and its mirror of the sampled values (widened to contain 0)."""
    q = torch.tensor([(100.0 - percentile) / 100.0, percentile / 100.0])
    lo, hi = torch.quantile(observer.values()[: 1 << 24], q).tolist()
    return (min(lo, 0.0) if signed else 0.0), max(hi, 0.0)


def mse_range(observer: ActObserver, bits: int, *, signed: bool, percentile: float = 99.99) -> tuple[float, float]:
    """The shrinking of the observed range that minimises the squared quantization error of the samples."""
    low, high = _observed(observer, signed)
    values = observer.values()
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
