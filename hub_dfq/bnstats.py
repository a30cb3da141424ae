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
    "capture_bn_inputs",
    "bn_layers_with_stats",
    "running_moments",
    "gaussian_kl",
    "symmetric_kl",
    "wasserstein2",
    "zeroq_l2",
    "DIVERGENCES",
]

BNLayers = Sequence[tuple[str, nn.Module]]


def reduce_dims(x: torch.Tensor) -> tuple[int, ...]:
    """Dimensions a BatchNorm reduces over: all but the channel dimension 1."""
    return (0,) + tuple(range(2, x.dim()))


class _Moments(torch.autograd.Function):
    """Per-channel mean and biased variance with a one-pass, one-kernel backward.

    ``torch.var_mean`` over (N, H, W) is ~20x slower on CPU than two plain reductions, and its
    autograd formula runs several elementwise passes; here the backward is a single ``addcmul``:
    d/dx = g_mean / M + 2 g_var (x - mean) / M.  Low-precision inputs are reduced in float32.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        dims = reduce_dims(x)
        count = x.numel() // x.shape[1]
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        mean = xf.sum(dims) / count
        # E[x^2] - E[x]^2 in (at least) float32: BN inputs have |mean| of the order of std, so the
        # cancellation costs a few bits at most; clamp keeps dead channels at exactly 0.
        var = ((xf * xf).sum(dims) / count - mean * mean).clamp_min(0.0)
        ctx.save_for_backward(x, mean)
        ctx.count = count
        return mean, var

    @staticmethod
    def backward(ctx, grad_mean: torch.Tensor, grad_var: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x, mean = ctx.saved_tensors
        shape = (1, -1) + (1,) * (x.dim() - 2)
        slope = (2.0 / ctx.count) * grad_var
        offset = grad_mean / ctx.count - slope * mean
        xf = x if x.dtype == mean.dtype else x.to(mean.dtype)
        return torch.addcmul(offset.view(shape), xf, slope.view(shape)).to(x.dtype)


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
    return [(bn.running_mean.detach().to(device=device, dtype=dtype), bn.running_var.detach().to(device=device, dtype=dtype))
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


# Per-channel divergences, averaged over channels in reports.
DIVERGENCES = {"kl": gaussian_kl, "symmetric_kl": symmetric_kl, "w2": wasserstein2}
