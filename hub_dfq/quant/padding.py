"""Static padding: convolutions that pad their own input become plain ones, and zero pads join the convolution.

TF-ported timm models (``tf_efficientnet*``, ``tf_mobilenetv3*``, ``tf_efficientnetv2*``, ...) use timm's
``Conv2dSame``, which pads its input "same" as TensorFlow does (asymmetric: the odd pixel goes right and
bottom) at every call. A classifier's input size is fixed, so these pads are constants of the traced shapes:
:func:`expand_same_padding` rewrites each such layer into ``F.pad`` with the static pads followed by a plain
``nn.Conv2d``, which BN folding and the quantized layers then treat like any other convolution.

:func:`zero_pad_input` recognises a zero pad in front of a convolution (``F.pad``, ``nn.ZeroPad2d``,
``nn.ConstantPad2d`` with value 0; transformers' EfficientNet and MobileNetV2 write them, and the rewrite above
leaves them): the quantized convolution absorbs it. Zero padding commutes with quantization (0 is exact on
every activation grid) and ONNX ``Conv`` / ``QLinearConv`` take asymmetric pads, so the integer kernel pads
with its input's zero point and no float ``Pad`` sits between a ``DequantizeLinear`` and the convolution.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import fx, nn

from ..models.same_padding import same_padded_types, same_pads

__all__ = ["same_pads", "expand_same_padding", "zero_pad_input"]


def expand_same_padding(gm: fx.GraphModule, types: tuple[type[nn.Module], ...] | None = None) -> list[str]:
    """Rewrite every "same"-padding convolution of ``gm`` into a static ``F.pad`` and a plain ``nn.Conv2d``.

    The graph's nodes must carry shapes (``ShapeProp``). The new convolution keeps the layer's qualified
    name and parameters, so BN folding, overrides and checkpoints address it as before. ``types``: the
    "same"-padding classes of the model's family (``TracingHints.same_padded``); default every family's.

    Returns:
        Qualified names of the rewritten layers.
    """
    types = same_padded_types() if types is None else types
    if not types:
        return []
    modules = dict(gm.named_modules())
    rewritten = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(modules.get(node.target)) not in types:
            continue
        source = node.args[0] if node.args else None
        meta = source.meta.get("tensor_meta") if isinstance(source, fx.Node) else None
        if meta is None or not hasattr(meta, "shape"):
            continue  # no static shape known: leave it (reported as unsupported)
        layer = modules[node.target]
        conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride, padding=0,
                         dilation=layer.dilation, groups=layer.groups, bias=layer.bias is not None,
                         device=layer.weight.device, dtype=layer.weight.dtype)
        conv.weight, conv.bias = layer.weight, layer.bias  # gm is already a private copy: share, do not copy
        gm.set_submodule(node.target, conv)
        pads = same_pads(tuple(meta.shape[-2:]), layer.kernel_size, layer.stride, layer.dilation)
        if any(pads):
            with gm.graph.inserting_before(node):
                pad = gm.graph.call_function(F.pad, (source, pads))
            pad.meta.update(source.meta)
            pad.meta.pop("tensor_meta", None)  # a different shape; ShapeProp fills it again
            node.replace_input_with(source, pad)
        rewritten.append(node.target)
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return rewritten


def zero_pad_input(node: fx.Node, modules: dict[str, nn.Module],
                   spatial_dims: int) -> tuple[fx.Node, tuple[int, ...]] | None:
    """The tensor ``node`` zero-pads and its pads (``F.pad`` order), if ``node`` is such a pad of the last
    ``spatial_dims`` dimensions with non-negative integer pads; ``None`` otherwise."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_function" and node.target is F.pad:
        pads = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    elif node.op == "call_module" and isinstance(modules.get(node.target), nn.modules.padding._ConstantPadNd):
        module = modules[node.target]
        pads, mode, value = module.padding, "constant", module.value
    else:
        return None
    if mode != "constant" or value not in (None, 0, 0.0) or not isinstance(pads, (tuple, list)):
        return None
    if len(pads) != 2 * spatial_dims or not all(isinstance(p, int) and p >= 0 for p in pads):
        return None
    return node.args[0], tuple(pads)
