"""What stays in floating point in a prepared graph, and why: nothing is left in float silently.

Two kinds, reported apart:

- *unsupported*: layers with weights that an integer model would quantize but this one cannot (a
  convolution subclass with its own forward, weights used by a functional matrix product);
- *float by design*: what integer runtimes, ONNX Runtime included, compute in float too:
  normalisations over a tensor's own statistics (LayerNorm, GroupNorm, ...), a BatchNorm with no
  convolution before it to fold into (a per-channel scale and shift), and learned tensors that are
  added or multiplied (position embeddings, class tokens, layer scales).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..models.vision_model import BN_TYPES
from .modules import QuantModule

__all__ = ["float_parts"]

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm) + \
    ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_NORM_REASON = "normalisation over the tensor's own statistics"
# Ops that make a parameter the weight of a matrix product: it should have been a layer module.
_PRODUCT_FUNCTIONS = (F.linear, F.conv1d, F.conv2d, F.conv3d, torch.matmul, torch.bmm, torch.mm, torch.addmm,
                      torch.einsum, operator.matmul)
_PRODUCT_METHODS = ("matmul", "mm", "bmm")


def _is_norm(module: nn.Module | None) -> bool:
    # by class name too: timm's LayerNorm2d, transformers' ConvNextLayerNorm, ... (often traced through)
    return isinstance(module, _NORMS) or (module is not None and type(module).__name__.endswith("Norm"))


def _attr(gm: fx.GraphModule, target: str) -> object:
    value: object = gm
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def _module_parts(gm: fx.GraphModule, skip: set[str]) -> tuple[list[str], list[str]]:
    modules = dict(gm.named_modules())
    unsupported, by_design = [], []
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in skip:
            continue
        m = modules[node.target]
        if isinstance(m, (QuantModule, *BN_TYPES)) or not any(True for _ in m.parameters()):
            continue
        if _is_norm(m):
            by_design.append(f"{node.target} ({type(m).__name__}: {_NORM_REASON})")
        else:
            unsupported.append(f"{node.target} ({type(m).__name__})")
    return unsupported, by_design


def _parameter_parts(gm: fx.GraphModule, originals: dict[str, nn.Module]) -> tuple[list[str], list[str]]:
    """Parameters the graph reads directly (``get_attr``): what fx traced through leaves behind."""
    modules = dict(gm.named_modules())
    unsupported, by_design = [], []
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not isinstance(_attr(gm, node.target), nn.Parameter):
            continue
        owner_name = node.target.rpartition(".")[0]
        if isinstance(modules.get(owner_name), QuantModule) or all(u.target is getattr for u in node.users):
            continue  # a quantized layer's own weight, or only its dtype or shape is read
        original = originals.get(owner_name)
        if owner_name and _is_norm(original):
            entry = f"{owner_name} ({type(original).__name__}: {_NORM_REASON})"
            if entry not in by_design:
                by_design.append(entry)
        elif any(u.target in _PRODUCT_FUNCTIONS or (u.op == "call_method" and u.target in _PRODUCT_METHODS)
                 for u in node.users):
            name, kind = (owner_name, type(original).__name__) if original is not None and owner_name else \
                (node.target, "parameter")
            entry = f"{name} ({kind}: weights of a functional matrix product, no layer to quantize)"
            if entry not in unsupported:
                unsupported.append(entry)
        else:
            by_design.append(f"{node.target} (a learned tensor added or multiplied in float: embedding, token "
                             "or scale)")
    return unsupported, by_design


def float_parts(gm: fx.GraphModule, originals: dict[str, nn.Module], *, skip: set[str],
                unfolded_bn: list[str]) -> tuple[list[str], list[str]]:
    """Name every parameter of a prepared graph that stays in floating point, with the reason.

    Args:
        gm: the graph after layer swaps.
        originals: the float model's modules by qualified name; a module fx traced through (timm's
            LayerNorm with its own forward) leaves only its parameters in the graph, and its class says
            what they are.
        skip: module names left in float on purpose (``exclude``), reported elsewhere.
        unfolded_bn: BatchNorm layers that had no convolution to fold into.

    Returns:
        ``(unsupported, float_by_design)``: entries ``"name (Type: reason)"``.
    """
    unsupported, by_design = _module_parts(gm, skip)
    by_design += [f"{name} (BatchNorm with no convolution before it to fold into: a per-channel scale and shift)"
                  for name in unfolded_bn]
    more_unsupported, more_by_design = _parameter_parts(gm, originals)
    return unsupported + more_unsupported, by_design + more_by_design
