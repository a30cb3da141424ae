"""The BN-statistics loss, accumulated during the forward pass.

Each BN layer's input is reduced to per-channel moments at once and the layer's divergence added to
a running list, so no activation is kept beyond what autograd needs, and a forward pass can stop
right after the last BN layer when nothing downstream (logits) is needed. The optimisation loop's
private model copy swaps its BN layers for :class:`StatsBatchNorm`, which computes the BN output and
the moments in one autograd node; any other BN layer is read through a forward pre-hook.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ..bnstats import affine_moments, batch_moments, gaussian_kl
from ..models.vision_model import BN_TYPES, bn_remainder
from ..registry import resolve
from .registry import BN_LOSSES

__all__ = ["BNLossTerms", "bn_loss", "StopForward", "StatsBatchNorm", "swap_batchnorms", "kl_term", "reverse_kl_term"]


class StopForward(Exception):
    """Raised by the last BN hook to end a forward pass whose logits are not needed."""


def kl_term(running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor,
            var: torch.Tensor) -> torch.Tensor:
    """One layer's paper loss: KL(N(running) || N(batch)) averaged over channels."""
    return gaussian_kl(running_mean, running_var, mean, var).mean()


def reverse_kl_term(running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                    *, eps: float = 1e-5) -> torch.Tensor:
    """One layer's KL(N(batch) || N(running)) averaged over channels, with the layer's own BN ``eps`` added to
    both variances.

    Bounded (logarithmically) where a batch leaves a channel nearly dead, which the paper's direction punishes
    as ``running_var / batch_var``: on EfficientNet-Lite0 the paper's KL of a noise batch is dominated by a few
    such channels after the depthwise convs, and its steep barrier spends Adam's normalised steps on them. The
    ``eps`` is the model's own: below it the BN itself cannot tell variances apart.
    """
    return gaussian_kl(mean, var, running_mean, running_var, eps=eps).mean()


class BNLossTerms:
    """Per-layer BN divergences of the last forward pass (see :func:`bn_loss`).

    Attributes:
        terms: one 0-d tensor per BN layer reached, in forward order (differentiable).
    """

    def __init__(self, layers: Sequence[tuple[str, nn.Module]], loss: str, stop_after_last: bool):
        self.names = [name for name, _ in layers]
        self.loss = loss
        descriptor = BN_LOSSES.get(loss)
        self._term = resolve(descriptor.layer_term)
        self._eps = [_bn_eps(layer) for _, layer in layers] if descriptor.layer_eps else None
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

    def _record(self, index: int, mean: torch.Tensor, var: torch.Tensor) -> None:
        running_mean, running_var = self._running[index]
        extra = {"eps": self._eps[index]} if self._eps is not None else {}
        self.terms.append(self._term(running_mean.to(mean.device), running_var.to(mean.device), mean, var, **extra))
        if index == len(self.names) - 1 and self.stop_after_last:
            raise StopForward

    def _hook(self, index: int):
        def hook(_module, args):
            if self.enabled:
                self._record(index, *batch_moments(args[0]))
            return None

        return hook


def _bn_eps(layer: nn.Module) -> float:
    bn = layer.bn if isinstance(layer, StatsBatchNorm) else layer
    return float(getattr(bn, "eps", 1e-5))


class StatsBatchNorm(nn.Module):
    """An eval-mode BatchNorm that also hands its input's moments to the BN loss, in one autograd node.

    With a loss attached the output is ``x * scale + shift`` per channel (then timm's dropout and
    activation, if any); without one it is the wrapped BN itself.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.bn = bn
        with torch.no_grad():
            std = torch.sqrt(bn.running_var.float() + bn.eps)
            scale = (bn.weight.float() if bn.weight is not None else torch.ones_like(std)) / std
            bias = bn.bias.float() if bn.bias is not None else torch.zeros_like(std)
            self.register_buffer("scale", scale)
            self.register_buffer("shift", bias - bn.running_mean.float() * scale)
        self.after = bn_remainder(bn)
        self.clamp = _clamp_range(self.after)  # a ReLU/ReLU6 after the BN runs inside the same autograd node
        self.sink: Callable[[torch.Tensor, torch.Tensor], None] | None = None
        self.last = False  # the loss stops the forward pass here: only the moments are needed

    @property
    def running_mean(self) -> torch.Tensor:
        return self.bn.running_mean

    @property
    def running_var(self) -> torch.Tensor:
        return self.bn.running_var

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sink is None:
            return self.bn(x)
        if self.last:
            self.sink(*batch_moments(x))
        y, mean, var = affine_moments(x, self.scale, self.shift, self.clamp)
        self.sink(mean, var)
        return y if self.clamp is not None else self.after(y)


def _clamp_range(act: nn.Module) -> tuple[float, float] | None:
    """``(low, high)`` when ``act`` is a ReLU, ReLU6 or Hardtanh (a clamp), else ``None``."""
    if type(act) is nn.ReLU:
        return 0.0, float("inf")
    if type(act) in (nn.ReLU6, nn.Hardtanh):
        return float(act.min_val), float(act.max_val)
    return None


def _plain_forward(bn: nn.Module) -> bool:
    """Whether ``bn`` computes an eval-mode BN from running statistics (then, for timm, dropout + act)."""
    if not isinstance(bn, BN_TYPES) or bn.running_mean is None or bn.running_var is None:
        return False
    forwards = {nn.BatchNorm1d.forward, nn.BatchNorm2d.forward, nn.BatchNorm3d.forward}
    timm_layers = sys.modules.get("timm.layers")  # a timm BN only exists if timm is loaded: no need to import it
    if timm_layers is not None:
        forwards.add(timm_layers.BatchNormAct2d.forward)
    return type(bn).forward in forwards


def swap_batchnorms(module: nn.Module, names: Sequence[str]) -> nn.Module:
    """Replace (in place) the named eval-mode BN layers of ``module`` by :class:`StatsBatchNorm`.

    Layers whose forward is not a plain BN are left as they are (the loss reads them with a hook).
    """
    for name in names:
        bn = module.get_submodule(name)
        if _plain_forward(bn):
            module.set_submodule(name, StatsBatchNorm(bn))
    return module


@contextmanager
def bn_loss(layers: Sequence[tuple[str, nn.Module]], *, loss: str = "kl",
            stop_after_last: bool = False) -> Iterator[BNLossTerms]:
    """Accumulate the BN loss during forward passes inside the block; always detached on exit.

    Args:
        layers: BN layers in forward order (``VisionModel.bn_layers``), or their
            :class:`StatsBatchNorm` stand-ins.
        loss: a registered BN loss (:data:`~hub_dfq.synth.registry.BN_LOSSES`).
        stop_after_last: raise :class:`StopForward` once the last BN layer has been seen; catch it
            around the model call.

    Yields:
        The :class:`BNLossTerms` collecting the terms; call ``reset()`` before each forward.
    """
    state = BNLossTerms(layers, loss, stop_after_last)
    handles, swapped = [], []
    for i, (_, layer) in enumerate(layers):
        if isinstance(layer, StatsBatchNorm):
            layer.sink = _sink(state, i)
            layer.last = stop_after_last and i == len(layers) - 1
            swapped.append(layer)
        else:
            handles.append(layer.register_forward_pre_hook(state._hook(i)))
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()
        for layer in swapped:
            layer.sink, layer.last = None, False


def _sink(state: BNLossTerms, index: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def sink(mean: torch.Tensor, var: torch.Tensor) -> None:
        if state.enabled:
            state._record(index, mean, var)

    return sink
