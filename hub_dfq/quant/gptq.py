"""Second-order weight rounding (GPTQ / Optimal Brain Quantization; Frantar et al. 2022, 2023).

Each weight layer's rounding is chosen to keep its *output* on the calibration images, not its weights,
close to full precision. With ``X`` the layer's (quantized) inputs unfolded into columns, the output error of
a weight change ``dW`` is ``dW H dW^T`` with ``H = X X^T``. Columns (input channels x kernel taps) are rounded
one at a time and the error each one makes is pushed onto the columns not yet rounded, weighted by the inverse
Hessian, so that the later columns compensate for it. No iterations: one pass of the data per layer.

Grouped convolutions get one Hessian per group: a depthwise 3x3 convolution has a 9 x 9 one per channel,
which is where 4-bit weights lose most (9 weights per output channel leave little room) and where the
compensation helps most. Layers are quantized in graph order, block by block, each seeing the inputs the
already-quantized layers before it produce, so the error of earlier layers is compensated too.

The result is a rounding start point: :attr:`~hub_dfq.quant.quantizers.WeightQuantizer.start` holds the
compensated weights in units of the step, so nearest rounding of it gives the GPTQ integers, and block
reconstruction (:mod:`hub_dfq.quant.reconstruct`) can start its learned rounding there instead of at the
float weights.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..progress import progress_enabled
from .blocks import Block, BlockWalk, module_device, partition
from .calibrate import quant_layers, quant_mode
from .modules import QuantLinear, QuantModule
from .observers import asymmetric_grid
from .quantizers import weight_qrange, weight_span

logger = logging.getLogger(__name__)

__all__ = ["GPTQConfig", "HessianStats", "gptq_layer", "gptq_rounding", "search_scales", "layer_columns"]

_SCALE_GRID = 40  # clipping ratios tried by the Hessian-weighted scale search


@dataclass(frozen=True)
class GPTQConfig:
    """Settings of second-order rounding.

    Args:
        damp: added to the Hessian's diagonal, as a fraction of its mean (keeps the inverse well conditioned).
            Heavier than GPTQ's 0.01 because a Hessian from a few hundred images (synthetic ones most of all)
            overstates the cross-terms the compensation trusts: on Lite0 W4A8, 128 BNS images, 0.01 / 0.1 /
            0.3 gave 79.6 / 81.6 / 84.4% top-1 on half of the shared images (float 86.0; 250 real images 84.0 /
            84.8 at 0.01 / 0.1); on all 500 the default run went from -9.6 to -5.2 points (docs/imagenet.md).
        act_order: round the columns with the largest inputs first (they matter most; the rest compensates).
        scale_search: ``"hessian"`` re-chooses each output channel's step to minimise the output error
            weighted by ``diag(H)`` before rounding; ``"keep"`` keeps the weight observer's steps.
        target: ``"float"`` fits the full-precision layer's output on full-precision inputs, so each layer also
            corrects the error the quantized layers and activations before it left in its inputs (GPTAQ, Li et
            al. 2025); ``"quantized"`` fits the layer's own float output on its quantized inputs (GPTQ).
        refine: sweeps of greedy coordinate descent over the rounded integers after GPTQ's single pass (each
            sweep tries one step up or down for every weight and keeps it when the layer's damped output error
            falls; CDQuant, Nair & Suggala 2024): GPTQ rounds each column once and never revisits it. Lite0 W4A8:
            real images -3.2 -> -2.2 points, bns+p images -4.2 -> -4.0; CIFAR ResNet-20 / -44: -0.05 / +0.19.
        batch_size: images per forward pass while collecting the Hessians.
        seed: unused (GPTQ draws nothing at random); kept so every algorithm takes the run's seed.
    """

    damp: float = 0.3
    act_order: bool = True
    scale_search: str = "hessian"
    target: str = "float"
    refine: int = 4
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.damp < 1.0:
            raise ConfigError(f"GPTQ damp must be in (0, 1), got {self.damp!r}")
        if self.scale_search not in ("hessian", "keep"):
            raise ConfigError(f"GPTQ scale_search must be 'hessian' or 'keep', got {self.scale_search!r}")
        if self.target not in ("float", "quantized"):
            raise ConfigError(f"GPTQ target must be 'float' or 'quantized', got {self.target!r}")
        if isinstance(self.refine, bool) or not isinstance(self.refine, int) or self.refine < 0:
            raise ConfigError(f"GPTQ refine must be a non-negative integer (sweeps), got {self.refine!r}")
        if self.batch_size <= 0:
            raise ConfigError(f"GPTQ batch_size must be > 0, got {self.batch_size!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- the columns a layer multiplies its weights with ---------------------------------------------------------
def _groups(layer: nn.Module) -> int:
    return 1 if isinstance(layer, QuantLinear) else int(layer.groups)


def layer_columns(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input columns of ``layer`` for input ``x``: ``(groups, K, M)`` with ``K`` weights per output channel of
    a group and ``M`` output positions (images x pixels), so that the layer's output is ``W[g] @ columns[g]``."""
    x = x.detach().float()
    if isinstance(layer, QuantLinear):
        return x.reshape(-1, x.shape[-1]).t().unsqueeze(0)
    if x.dim() == 3:  # Conv1d: a 2D convolution of height 1
        x = x.unsqueeze(2)
        kernel, stride, padding, dilation = ((1, *layer.kernel_size), (1, *layer.stride), (0, *layer.padding),
                                             (1, *layer.dilation))
    else:
        kernel, stride, padding, dilation = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = (0,) * len(kernel)
    elif getattr(layer, "pre_pad", None) is not None:
        x = F.pad(x, layer.pre_pad)
    groups = _groups(layer)
    if all(k == 1 for k in kernel) and all(p == 0 for p in padding):  # a 1x1 convolution reads pixels as they are
        x = x[:, :, ::stride[0], ::stride[1]]
        n, c = x.shape[:2]
        return x.reshape(n, groups, c // groups, -1).permute(1, 2, 0, 3).reshape(groups, c // groups, -1)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (N, C*kh*kw, L)
    n, k, positions = cols.shape
    return cols.reshape(n, groups, k // groups, positions).permute(1, 2, 0, 3).reshape(groups, k // groups, -1)


def _weight_matrix(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as ``(groups, out_per_group, K)``."""
    groups = _groups(layer)
    return weight.detach().float().reshape(groups, weight.shape[0] // groups, -1)


class HessianStats:
    """Running ``H = X X^T / M`` of one layer's input columns, per group, and (given the full-precision model's
    columns for the same images) ``D = (X_float - X) X^T / M``, how far the inputs are from full precision."""

    def __init__(self) -> None:
        self.hessian: torch.Tensor | None = None
        self.drift: torch.Tensor | None = None
        self.count = 0

    def update(self, columns: torch.Tensor, float_columns: torch.Tensor | None = None) -> None:
        cols = columns.double()
        batch = cols.shape[-1]
        if self.hessian is None:
            self.hessian = torch.zeros(cols.shape[0], cols.shape[1], cols.shape[1], dtype=torch.float64,
                                       device=cols.device)
        # running means, so the scale does not depend on how many images were seen
        keep, add = self.count / (self.count + batch), 1.0 / (self.count + batch)
        self.hessian.mul_(keep).baddbmm_(cols, cols.transpose(1, 2), alpha=add)
        if float_columns is not None:
            if self.drift is None:
                self.drift = torch.zeros_like(self.hessian)
            self.drift.mul_(keep).baddbmm_(float_columns.double() - cols, cols.transpose(1, 2), alpha=add)
        self.count += batch


# ---- steps and rounding ----------------------------------------------------------------------------------------
def search_scales(weight: torch.Tensor, hessian_diag: torch.Tensor, scale: torch.Tensor, qmin: int,
                  qmax: int) -> torch.Tensor:
    """Per output channel, the clipping of ``scale`` (ratios 1 down to 0.2) that minimises
    ``sum_k H_kk (w_k - q(w_k))^2``: the output error of nearest rounding, without the cross terms.

    Args:
        weight: ``(groups, R, K)``.
        hessian_diag: ``(groups, K)``.
        scale: ``(groups, R)``, the largest step to try (the observer's, or ``max|w| / qmax``).
    """
    absmax = weight.abs().amax(dim=-1) / qmax
    top = torch.maximum(scale, absmax).clamp_min(1e-8)
    best, best_err = top.clone(), torch.full_like(top, float("inf"))
    diag = hessian_diag.unsqueeze(1)
    for i in range(_SCALE_GRID):
        candidate = top * (1.0 - 0.8 * i / _SCALE_GRID)
        q = torch.clamp(torch.round(weight / candidate[..., None]), qmin, qmax) * candidate[..., None]
        err = ((weight - q).square() * diag).sum(-1)
        better = err < best_err
        best = torch.where(better, candidate, best)
        best_err = torch.where(better, err, best_err)
    return best


Bound = Union[int, torch.Tensor]


def row_bounds(wq, groups: int, rows: int) -> tuple[Bound, Bound]:
    """``wq``'s integer range per output channel as ``(groups, rows)`` tensors (ints on a symmetric grid)."""
    low, high = wq.bounds()
    if isinstance(low, int):
        return low, high
    return low.reshape(groups, rows), high.reshape(groups, rows)


def clamp_rows(values: torch.Tensor, low: Bound, high: Bound) -> torch.Tensor:
    """``values`` (``(groups, rows, K)``) clamped to each row's integer range (``(groups, rows)`` or ints)."""
    if isinstance(low, int):
        return torch.clamp(values, low, high)
    return torch.clamp(values, low[..., None].to(values.dtype), high[..., None].to(values.dtype))


def hessian_grid(weight: torch.Tensor, importance: torch.Tensor, bits: int, *, symmetric: bool,
                 scale: torch.Tensor) -> tuple[torch.Tensor, Bound, Bound]:
    """Each row's step and integer range for ``weight`` (``(groups, R, K)``), clipped to the least
    ``importance``-weighted rounding error (``importance``: the Hessian's diagonal, ``(groups, K)``): a symmetric grid
    searched down from ``scale`` (``(groups, R)``), or an asymmetric one over each row's own range."""
    if symmetric:
        qmin, qmax = weight_qrange(bits)
        return search_scales(weight, importance, scale, qmin, qmax), qmin, qmax
    step, low = asymmetric_grid(weight, bits, importance=importance)
    return step, low, low + weight_span(bits)


def damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp * mean(diag H) * I`` per group, in float64, with always-zero inputs (a dead channel, a whole dead
    group) given a unit diagonal."""
    h = hessian.double().clone()
    diag = torch.diagonal(h, dim1=1, dim2=2)
    diag.masked_fill_(diag <= 0, 1.0)
    return h + torch.diag_embed((damp * diag.mean(1))[:, None].expand(-1, h.shape[-1]))


def refine_rounding(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, integers: torch.Tensor,
                    qmin: Bound, qmax: Bound, *, sweeps: int) -> torch.Tensor:
    """Greedy coordinate descent on ``(W - Q s) H (W - Q s)^T``: move single integers by one step while that lowers
    the error (every move does, so the error never rises above the start's).

    Args:
        weight: ``(groups, R, K)`` the weights to approximate.
        hessian: ``(groups, K, K)`` the (damped) Hessian.
        scale: ``(groups, R)`` steps.
        integers: ``(groups, R, K)`` the starting integers (GPTQ's).
        qmin, qmax: the integer range: ints, or ``(groups, R)`` tensors (one range per row, asymmetric grids).
        sweeps: passes over the columns at most (stops early when one changes nothing).

    Returns:
        ``(groups, R, K)`` integers in ``[qmin, qmax]``.
    """
    h = hessian.double()
    q = integers.double().clone()
    s = scale.double()
    grad = torch.bmm(q * s[..., None] - weight.double(), h)  # (W_q - W) H: half the error's gradient in W_q
    diag = torch.diagonal(h, dim1=1, dim2=2)
    for _ in range(sweeps):
        moved = False
        for k in range(q.shape[-1]):
            curvature = s.square() * diag[:, k, None]
            slope = 2.0 * s * grad[:, :, k]
            step = torch.zeros_like(slope)  # at most one direction lowers a convex 1-D quadratic
            step = torch.where((slope + curvature < 0) & (q[:, :, k] < qmax), 1.0, step)
            step = torch.where((curvature - slope < 0) & (q[:, :, k] > qmin), -1.0, step)
            if not step.any():
                continue
            moved = True
            q[:, :, k] += step
            grad += (step * s)[..., None] * h[:, k, None, :]
        if not moved:
            break
    return q


def gptq_rounding(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, qmin: Bound, qmax: Bound, *,
                  damp: float = 0.01, act_order: bool = True) -> torch.Tensor:
    """Round ``weight`` column by column, compensating each column's error on the rest.

    Args:
        weight: ``(groups, R, K)`` float weights.
        hessian: ``(groups, K, K)`` ``X X^T`` of the inputs.
        scale: ``(groups, R)`` step of each output channel.
        qmin, qmax: the integer range: ints, or ``(groups, R)`` tensors (one range per row, asymmetric grids).
        damp: diagonal damping as a fraction of the mean diagonal.
        act_order: round columns in order of decreasing ``H_kk``.

    Returns:
        ``(groups, R, K)``: the compensated weights in units of the step (their nearest rounding, clamped to
        ``[qmin, qmax]``, is the GPTQ result).
    """
    w = weight.double().clone()
    h = hessian.double().clone()
    groups, rows, k = w.shape
    diag = torch.diagonal(h, dim1=1, dim2=2)
    dead = diag <= 0
    if dead.any():  # an input that is always zero: its weights cannot matter
        diag.masked_fill_(dead, 1.0)
        w.masked_fill_(dead.unsqueeze(1), 0.0)
    if act_order:
        perm = torch.argsort(diag, dim=1, descending=True)
        w = torch.gather(w, 2, perm.unsqueeze(1).expand(-1, rows, -1))
        h = torch.gather(h, 1, perm.unsqueeze(2).expand(-1, -1, k))
        h = torch.gather(h, 2, perm.unsqueeze(1).expand(-1, k, -1))
    mean_diag = torch.diagonal(h, dim1=1, dim2=2).mean(dim=1)
    h = h + torch.diag_embed((damp * mean_diag)[:, None].expand(-1, k))
    # upper Cholesky factor of H^-1: row i holds the compensation of column i onto the columns after it
    chol = torch.linalg.cholesky(h)
    u = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    s = scale.double()
    if not isinstance(qmin, int):
        qmin, qmax = qmin.double(), qmax.double()
    start = torch.empty_like(w)
    for i in range(k):
        col = w[:, :, i] / s
        start[:, :, i] = col
        q = torch.clamp(torch.round(col), qmin, qmax)
        err = (w[:, :, i] - q * s) / u[:, i, i][:, None]
        if i + 1 < k:
            w[:, :, i + 1:] -= err[:, :, None] * u[:, None, i, i + 1:]
    if act_order:
        start = torch.empty_like(start).scatter_(2, perm.unsqueeze(1).expand(-1, rows, -1), start)
    return start.float()


def float_target(weight: torch.Tensor, hessian: torch.Tensor, drift: torch.Tensor, *, damp: float) -> torch.Tensor:
    """``W + W D H^-1``: the least-squares weights taking the inputs ``X`` to ``W X_float`` (``D = (X_float - X) X^T``),
    with ``H`` damped as GPTQ damps it. Equal to ``W`` when the inputs are the full-precision ones."""
    h = damped(hessian, damp)
    w = weight.double()
    correction = torch.linalg.solve(h, torch.bmm(drift.double().transpose(1, 2), w.transpose(1, 2))).transpose(1, 2)
    return (w + correction).to(weight.dtype)


def gptq_layer(layer: QuantModule, stats: HessianStats, cfg: GPTQConfig) -> dict[str, float]:
    """Choose ``layer``'s steps (optionally) and rounding start point from its input Hessian.

    Returns:
        The layer's output error ``tr(dW H dW^T)`` of nearest rounding and of GPTQ's, per output channel summed.
    """
    wq = layer.weight_quantizer
    w = _weight_matrix(layer, layer.weight)
    groups, rows, _ = w.shape
    h = stats.hessian
    if stats.drift is not None:  # the weights that map these inputs to the float layer's float output
        w = float_target(w, h, stats.drift, damp=cfg.damp)
    if cfg.scale_search == "hessian":
        scale, low, _ = hessian_grid(w, torch.diagonal(h, dim1=1, dim2=2).float(), wq.bits, symmetric=wq.symmetric,
                                     scale=wq.scale.detach().float().reshape(groups, rows))
        wq.set_grid(scale.reshape(-1), None if wq.symmetric else low.reshape(-1))
    scale = wq.scale.detach().float().reshape(groups, rows)
    low, high = row_bounds(wq, groups, rows)
    start = gptq_rounding(w, h, scale, low, high, damp=cfg.damp, act_order=cfg.act_order)
    if cfg.refine:
        chosen = refine_rounding(w, damped(h, cfg.damp), scale, clamp_rows(torch.round(start), low, high), low, high,
                                 sweeps=cfg.refine).float()
        # the refined integers, with the start's pull towards its other neighbour kept for learned rounding
        start = chosen + torch.clamp(start - chosen, -0.49, 0.49)
    wq.set_start(start.reshape(layer.weight.shape))

    def output_error(integers: torch.Tensor) -> float:
        delta = (w - integers * scale[..., None]).double()
        return float(torch.einsum("grk,gkl,grl->", delta, h, delta))

    nearest = clamp_rows(torch.round(w / scale[..., None]), low, high)
    return {"nearest": output_error(nearest), "gptq": output_error(clamp_rows(torch.round(start), low, high))}


Batches = Callable[[], Iterator[tuple[list[torch.Tensor], list[torch.Tensor] | None]]]


def collect_hessian(module: nn.Module, layer: nn.Module, batches: Batches) -> HessianStats:
    """``layer``'s input statistics: ``module`` run on each ``(inputs, float_inputs)`` batch, quantized on the
    first and (when given) in full precision on the second."""
    stats = HessianStats()
    float_columns: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple) -> None:
        if float_columns and float_columns[-1] is None:
            float_columns[-1] = layer_columns(module, args[0])
        else:
            stats.update(layer_columns(module, args[0]), float_columns.pop() if float_columns else None)

    handle = layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for inputs, float_inputs in batches():
                if float_inputs is not None:
                    float_columns.append(None)
                    with quant_mode(module, enabled=False):
                        module(*float_inputs)
                module(*inputs)
    finally:
        handle.remove()
    return stats


def gptq_block(module: nn.Module, batches: Batches, cfg: GPTQConfig) -> dict[str, dict[str, float]]:
    """GPTQ every not yet frozen weight layer of ``module`` in order.

    Args:
        module: a block (or a whole prepared model).
        batches: yields ``(inputs, float_inputs)`` of ``module`` for each calibration batch: what the quantized
            model feeds it, and (for ``cfg.target == "float"``) what the full-precision model feeds it.
        cfg: settings.

    Each layer's statistics are collected with the layers before it already rounded (one pass over the batches
    per layer), so their error is part of what it compensates.
    """
    errors = {}
    for name, layer in quant_layers(module):
        if layer.weight_quantizer.frozen or not layer.weight_quantizer.enabled:
            continue
        stats = collect_hessian(module, layer, batches)
        if stats.hessian is None:
            continue
        errors[name] = gptq_layer(layer, stats, cfg)
    return errors


def walk_batches(block: Block, walk: BlockWalk, cfg: GPTQConfig) -> Batches:
    """The calibration batches of ``block`` from a :class:`~hub_dfq.quant.blocks.BlockWalk` (both streams)."""
    device = module_device(block.module)

    def batches():
        n = len(walk.q_env[block.inputs[0]])
        for start in range(0, n, cfg.batch_size):
            part = slice(start, start + cfg.batch_size)
            inputs = [walk.q_env[k][part].to(device) for k in block.inputs]
            float_inputs = [walk.fp_env[k][part].to(device) for k in block.inputs] if cfg.target == "float" else None
            yield inputs, float_inputs

    return batches


# Measured end to end on EfficientNet-Lite0 (CPU, 2 threads, 64 images: 72 s for calibration and GPTQ at
# 0.129 s per forward+backward pass): the two block streams, the Hessians and their inversions cost about this
# many float forward+backward passes per image (fewer with more images, as the inversions are per layer).
GPTQ_PASSES = 6.5


# One sweep of `refine` over every layer of Lite0 (CPU, 2 threads) costs about as much as this many float
# forward+backward passes of one image (4 sweeps: 25 s at 0.09 s per pass); it does not grow with the images.
REFINE_PASSES_PER_SWEEP = 70


def cost(settings: GPTQConfig, images: int, settings_of=None) -> float:
    """Float forward+backward passes of one image that GPTQ on ``images`` images costs (:mod:`hub_dfq.budget`)."""
    return GPTQ_PASSES * images + REFINE_PASSES_PER_SWEEP * settings.refine


def run_gptq(context) -> dict[str, Any]:
    """The ``gptq`` algorithm: every block in turn, on the calibration data as the blocks before it left it.

    Returns:
        ``{"layers": {name: {"nearest": error, "gptq": error}}}``: each layer's output error (on its calibration
        inputs) with nearest rounding and with GPTQ's.
    """
    cfg: GPTQConfig = context.settings
    blocks = partition(context.module, context.node_blocks)
    walk = BlockWalk(blocks, context.data, batch_size=cfg.batch_size)
    errors: dict[str, dict[str, float]] = {}
    for index, block in enumerate(tqdm(blocks, desc="gptq", disable=not progress_enabled(context.progress))):
        targets = walk.targets(block) if cfg.target == "float" else {}
        errors.update(gptq_block(block.module, walk_batches(block, walk, cfg), cfg))
        walk.advance(index, targets)
    return {"layers": errors}
