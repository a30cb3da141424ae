"""BatchNorm statistics: what a model remembers of its training data, and distances to it.

One implementation, two uses: synthesis optimises inputs until the batch moments at every BN input
match the running statistics (differentiable moments), and audits stream real data through the
model and accumulate the same moments in float64.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

__all__ = [
    "reduce_dims",
    "batch_moments",
    "affine_moments",
    "capture_bn_inputs",
    "bn_layers_with_stats",
    "running_moments",
    "gaussian_kl",
    "symmetric_kl",
    "reverse_kl",
    "wasserstein2",
    "zeroq_l2",
]

BNLayers = Sequence[tuple[str, nn.Module]]


def reduce_dims(x: torch.Tensor) -> tuple[int, ...]:
    """Dimensions a BatchNorm reduces over: all but the channel dimension 1."""
    return (0,) + tuple(range(2, x.dim()))


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel mean and biased variance in (at least) float32, and the count per channel.

    ATen's own BN statistics kernel (``batch_norm_update_stats`` with momentum 0 on scratch buffers): a
    two-pass mean and variance with float accumulation that reads bf16/fp16 activations directly. On one
    CPU thread it is ~4x faster than a float copy, ``x * x`` and two sums (no temporaries), and the
    two-pass variance has no E[x^2] - E[x]^2 cancellation.
    """
    count = x.numel() // x.shape[1]
    if x.numel() > 0 and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        channels = x.shape[1]
        scratch = dict(dtype=torch.float32, device=x.device)
        mean, var = torch.batch_norm_update_stats(x, torch.zeros(channels, **scratch),
                                                  torch.ones(channels, **scratch), 0.0)
        return mean, var.clamp_min(0.0), count
    dims = reduce_dims(x)  # float64 (audits) and empty batches
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    mean = xf.sum(dims) / count
    var = (xf - _channel_view(mean, xf)).square().sum(dims).div(count) if count else torch.zeros_like(mean)
    return mean, var, count


def _channel_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view((1, -1) + (1,) * (like.dim() - 2))


def _moments_grad(x: torch.Tensor, mean: torch.Tensor, count: int, grad_mean: torch.Tensor,
                  grad_var: torch.Tensor) -> torch.Tensor:
    """d/dx of the moments in one pass: g_mean / M + 2 g_var (x - mean) / M, in ``x``'s dtype."""
    slope = (2.0 / count) * grad_var
    offset = grad_mean / count - slope * mean
    # One pass in x's dtype: for bfloat16 the kernel computes in float32 and rounds once; only the
    # per-channel coefficients are rounded to bfloat16 (~0.4% of the gradient per |mean|/std).
    return torch.addcmul(_channel_view(offset.to(x.dtype), x), x, _channel_view(slope.to(x.dtype), x))


class _Moments(torch.autograd.Function):
    """Per-channel mean and biased variance with a one-pass, one-kernel backward.

    ``torch.var_mean`` over (N, H, W) is ~20x slower on CPU than two plain reductions, and its
    autograd formula runs several elementwise passes; here the backward is a single ``addcmul``.
    Low-precision inputs are reduced in float32.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        mean, var, count = _moments(x)
        ctx.save_for_backward(x, mean)
        ctx.count = count
        return mean, var

    @staticmethod
    def backward(ctx, grad_mean: torch.Tensor, grad_var: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x, mean = ctx.saved_tensors
        return _moments_grad(x, mean, ctx.count, grad_mean, grad_var)


class _AffineMoments(torch.autograd.Function):
    """``x * scale + shift`` per channel (an eval-mode BN), optionally clamped to ``[low, high]`` (the ReLU or
    ReLU6 after it), and the moments of ``x``, in one autograd node.

    The backward of all three is three passes over ``x`` (clamp mask, moments, BN) against the seven-odd
    that a BN, an in-place activation (autograd clones its input), a separate moments node and gradient
    accumulation take. ``scale``/``shift`` are constants (no gradient). Every elementwise op runs in
    ``x``'s dtype: CPU kernels whose output dtype differs from an input's (a bf16 result from float32
    operands) take a path 10-20x slower.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,  # type: ignore[override]
                clamp: tuple[float, float] | None = None):
        mean, var, count = _moments(x)
        y = torch.addcmul(_channel_view(shift.to(x.dtype), x), x, _channel_view(scale.to(x.dtype), x))
        if clamp is not None:
            y.clamp_(clamp[0], clamp[1])  # outside autograd: in place, no copy
            ctx.save_for_backward(x, mean, scale, y)
        else:
            ctx.save_for_backward(x, mean, scale)
        ctx.count, ctx.clamp = count, clamp
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_var):  # type: ignore[override]
        x, mean, scale = ctx.saved_tensors[:3]
        grad = _moments_grad(x, mean, ctx.count, grad_mean, grad_var)
        if grad_y is not None:
            if ctx.clamp is not None:  # no gradient where the clamp was active (torch's hardtanh rule)
                grad_y = torch.ops.aten.hardtanh_backward(grad_y, ctx.saved_tensors[3], *ctx.clamp)
            grad.addcmul_(grad_y, _channel_view(scale.to(x.dtype), x))
        return grad, None, None, None


def affine_moments(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                   clamp: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(clamp(x * scale + shift), mean(x), var(x))`` per channel, differentiable in ``x`` (see
    :func:`batch_moments`); ``clamp=(low, high)`` applies a ReLU/ReLU6-like activation in the same node."""
    return _AffineMoments.apply(x, scale, shift, clamp)


def batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of a BN input, in one pass (differentiable).

    Float32 (or float64 for float64 inputs) results, also for bfloat16/float16 activations.
    """
    if x.dim() < 2:
        raise ValueError(f"batch_moments needs (N, C, ...) activations, got shape {tuple(x.shape)}")
    mean, var = _Moments.apply(x)
    return mean, var


def bn_layers_with_stats(layers: BNLayers) -> list[tuple[str, nn.Module]]:
    """BN layers that track running statistics (the others remember nothing of the data)."""
    return [(name, bn) for name, bn in layers
            if getattr(bn, "running_mean", None) is not None and getattr(bn, "running_var", None) is not None]


def running_moments(layers: BNLayers, *, dtype: torch.dtype = torch.float64,
                    device: torch.device | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Detached ``(running_mean, running_var)`` of each layer: the model's memory of its training data."""
    return [(bn.running_mean.detach().to(device=device, dtype=dtype),
             bn.running_var.detach().to(device=device, dtype=dtype))
            for _, bn in layers]


@contextmanager
def capture_bn_inputs(layers: BNLayers, *, detach: bool = False) -> Iterator[list[torch.Tensor | None]]:
    """Record the input of every BN layer during forward passes inside the ``with`` block.

    Yields a list with one slot per layer that each forward pass overwrites. Hooks are always
    removed on exit, also when the block raises.
    """
    slots: list[torch.Tensor | None] = [None] * len(layers)

    def make_hook(i: int):
        def hook(_module, args):
            slots[i] = args[0].detach() if detach else args[0]

        return hook

    handles = [bn.register_forward_pre_hook(make_hook(i)) for i, (_, bn) in enumerate(layers)]
    try:
        yield slots
    finally:
        for handle in handles:
            handle.remove()


# ---- divergences between N(mu_p, var_p) (the model's memory) and N(mu_q, var_q) (the data) ------
# All are per channel and broadcast; eps keeps dead channels (var 0) finite.

def gaussian_kl(mu_p: torch.Tensor, var_p: torch.Tensor, mu_q: torch.Tensor, var_q: torch.Tensor,
                eps: float = 1e-5) -> torch.Tensor:
    """KL(N(mu_p, var_p) || N(mu_q, var_q)), the paper's BNS loss with p = running statistics."""
    var_p = var_p + eps
    var_q = var_q + eps
    return 0.5 * (torch.log(var_q / var_p) + (var_p + (mu_p - mu_q).square()) / var_q - 1.0)


def reverse_kl(mu_p, var_p, mu_q, var_q, eps: float = 1e-5) -> torch.Tensor:
    """KL(N(mu_q, var_q) || N(mu_p, var_p)): how unlikely the data's Gaussian is under the remembered one.

    Per image (one image's spatial moments, :mod:`hub_dfq.audit.images`) it separates noise, blur and
    contrast changes from clean images better than ``gaussian_kl``, which a single image's narrow spatial
    variance inflates at every layer.
    """
    return gaussian_kl(mu_q, var_q, mu_p, var_p, eps)


def symmetric_kl(mu_p, var_p, mu_q, var_q, eps: float = 1e-5) -> torch.Tensor:
    """Half the sum of both KL directions (Jeffreys divergence / 2)."""
    return 0.5 * (gaussian_kl(mu_p, var_p, mu_q, var_q, eps) + gaussian_kl(mu_q, var_q, mu_p, var_p, eps))


def wasserstein2(mu_p, var_p, mu_q, var_q, eps: float = 0.0) -> torch.Tensor:
    """Squared 2-Wasserstein distance between the two 1-D Gaussians."""
    return (mu_p - mu_q).square() + (torch.sqrt(var_p + eps) - torch.sqrt(var_q + eps)).square()


def zeroq_l2(mu_p, var_p, mu_q, var_q, eps: float = 1e-5) -> torch.Tensor:
    """ZeroQ's layer distance ||mu_p - mu_q||_2 + ||sigma_p - sigma_q||_2 over the channels (a scalar)."""
    return torch.linalg.vector_norm(mu_p - mu_q) + torch.linalg.vector_norm(
        torch.sqrt(var_p + eps) - torch.sqrt(var_q + eps))

