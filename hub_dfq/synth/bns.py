"""The BN-statistics loss, accumulated inside forward hooks.

Each hook reduces its BN input to per-channel moments at once and adds the layer's divergence to a
running list, so no activation is kept beyond what autograd needs, and a forward pass can stop
right after the last BN layer when nothing downstream (logits) is needed.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from ..bnstats import batch_moments, gaussian_kl, zeroq_l2

__all__ = ["BNLoss", "bn_loss", "StopForward", "layer_terms"]


class StopForward(Exception):
    """Raised by the last BN hook to end a forward pass whose logits are not needed."""


def layer_terms(loss: str, running_mean: torch.Tensor, running_var: torch.Tensor,
                mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """One layer's BN loss: channel-mean KL(N(running) || N(batch)), or ZeroQ's L2 distance."""
    if loss == "kl":
        return gaussian_kl(running_mean, running_var, mean, var).mean()
    return zeroq_l2(running_mean, running_var, mean, var)


class BNLoss:
    """Per-layer BN divergences of the last forward pass (see :func:`bn_loss`).

    Attributes:
        terms: one 0-d tensor per BN layer reached, in forward order (differentiable).
    """

    def __init__(self, layers: Sequence[tuple[str, nn.Module]], loss: str, stop_after_last: bool):
        self.names = [name for name, _ in layers]
        self.loss = loss
        self.stop_after_last = stop_after_last
        self.terms: list[torch.Tensor] = []
        self.enabled = True
        self._running = [(bn.running_mean.detach().float(), bn.running_var.detach().float()) for _, bn in layers]

    def reset(self) -> None:
        self.terms = []

    def total(self) -> torch.Tensor:
        """Sum of the layer terms of the last forward pass."""
        if len(self.terms) != len(self.names):
            raise RuntimeError(f"the forward pass reached {len(self.terms)} of {len(self.names)} BN layers")
        return torch.stack(self.terms).sum()

    def per_layer(self) -> dict[str, float]:
        return {name: float(term.detach()) for name, term in zip(self.names, self.terms)}

    def _hook(self, index: int):
        last = index == len(self.names) - 1
        running_mean, running_var = self._running[index]

        def hook(_module, args):
            if not self.enabled:
                return None
            mean, var = batch_moments(args[0])
            self.terms.append(layer_terms(self.loss, running_mean.to(mean.device), running_var.to(mean.device),
                                          mean, var))
            if last and self.stop_after_last:
                raise StopForward
            return None

        return hook


@contextmanager
def bn_loss(layers: Sequence[tuple[str, nn.Module]], *, loss: str = "kl",
            stop_after_last: bool = False) -> Iterator[BNLoss]:
    """Install hooks that accumulate the BN loss during forward passes; always removed on exit.

    Args:
        layers: BN layers in forward order (``VisionModel.bn_layers``).
        loss: ``kl`` or ``l2``.
        stop_after_last: raise :class:`StopForward` once the last BN layer has been seen; call the
            model through :func:`forward_bn` to catch it.

    Yields:
        The :class:`BNLoss` collecting the terms; call ``reset()`` before each forward.
    """
    state = BNLoss(layers, loss, stop_after_last)
    handles = [bn.register_forward_pre_hook(state._hook(i)) for i, (_, bn) in enumerate(layers)]
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()
