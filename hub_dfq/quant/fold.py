"""Fold every BatchNorm into the convolution before it, so the integer graph has no BN.

``y = gamma * (conv(x) - mean) / sqrt(var + eps) + beta`` equals a convolution with weights
``w * gamma / sqrt(var + eps)`` (per output channel) and bias ``beta + (b - mean) * gamma / sqrt(var + eps)``.
"""

from __future__ import annotations

import logging

import torch
from torch import fx, nn

from ..models.vision_model import BN_TYPES, bn_remainder

logger = logging.getLogger(__name__)

__all__ = ["fold_bn", "fold_batchnorms", "overrides_forward", "CONV_TYPES"]

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@torch.no_grad()
def fold_bn(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold ``bn`` (eval statistics) into ``conv`` in place; ``conv`` gains a bias if it had none."""
    weight = conv.weight.detach().double()
    std = torch.sqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(std)
    factor = gamma / std
    # ConvTranspose keeps output channels in dim 1; only plain convolutions (dim 0) are folded here.
    shape = [-1] + [1] * (weight.dim() - 1)
    conv.weight.copy_((weight * factor.view(shape)).to(conv.weight.dtype))
    old_bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(std)
    new_bias = (beta + (old_bias - bn.running_mean.double()) * factor).to(conv.weight.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias)
    else:
        conv.bias.copy_(new_bias)


def fold_batchnorms(gm: fx.GraphModule) -> tuple[list[str], list[str]]:
    """Fold each BN that directly follows a convolution used only by it; remove those BN nodes.

    Returns:
        ``(folded, unfolded)``: qualified names of the folded BN layers and of those left in float
        (no convolution right before them, or the convolution's output is used elsewhere).
    """
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded, unfolded = [], []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), BN_TYPES):
            continue
        bn = modules[node.target]
        prev = node.args[0] if node.args else None
        conv = modules.get(prev.target) if isinstance(prev, fx.Node) and prev.op == "call_module" else None
        if (not isinstance(conv, CONV_TYPES) or len(prev.users) != 1 or calls.get(prev.target, 0) != 1
                or calls.get(node.target, 0) != 1 or overrides_forward(conv, CONV_TYPES)):
            unfolded.append(node.target)
            continue
        fold_bn(conv, bn)
        remainder = bn_remainder(bn)
        gm.set_submodule(node.target, remainder)
        if isinstance(remainder, nn.Identity):
            node.replace_all_uses_with(prev)
            gm.graph.erase_node(node)
        folded.append(node.target)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    if unfolded:
        logger.warning("BatchNorm layers not folded (no convolution right before them), kept in float: %s",
                       ", ".join(unfolded))
    return folded, unfolded


def overrides_forward(module: nn.Module, bases: tuple[type[nn.Module], ...]) -> bool:
    """Whether ``module``'s class redefines ``forward`` relative to its first ancestor in ``bases``."""
    base = next((c for c in type(module).__mro__ if c in bases), None)
    return base is None or type(module).forward is not base.forward


