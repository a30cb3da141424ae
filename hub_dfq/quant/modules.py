"""Quantized counterparts of weight layers, and the registry that maps float classes to them.

A quantized layer owns its float weight and bias (BN already folded in) and a
:class:`~hub_dfq.quant.quantizers.WeightQuantizer`; activation quantizers are separate modules
placed in the graph (one tensor may feed several layers). The bias is put on the int32 grid of
``input_scale * weight_scale``, as an integer convolution adds it to its accumulator.

The registry is keyed by the float class and resolved through the class hierarchy, so subclasses
are covered; a subclass that redefines ``forward`` (e.g. timm's ``Conv2dSame``) is not, because
swapping it would change what it computes: register it explicitly (prepare rewrites timm's ``Conv2dSame``
into a plain convolution with a static zero pad first, see :mod:`hub_dfq.quant.padding`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import GRAPH_VERSION, QuantScheme
from .fold import overrides_forward
from .integer import IntegerLayer
from .quantizers import ActQuantizer, WeightQuantizer, round_ste

__all__ = ["register_qmodule", "unregister_qmodule", "qmodule_for", "QuantConv1d", "QuantConv2d", "QuantLinear",
           "QuantModule", "quant_layers", "act_quantizers"]

_REGISTRY: dict[type[nn.Module], type[nn.Module]] = {}
# Subclasses whose own ``forward`` computes exactly what their base's does (named, so that the
# core imports no model library): timm's Linear only adds a dtype cast for TorchScript.
_SAME_FORWARD = frozenset({"timm.layers.linear.Linear"})


def register_qmodule(float_cls: type[nn.Module]) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: use the decorated class for ``float_cls`` (and subclasses keeping its forward)."""

    def wrap(qcls: type[nn.Module]) -> type[nn.Module]:
        _REGISTRY[float_cls] = qcls
        return qcls

    return wrap


def unregister_qmodule(float_cls: type[nn.Module]) -> type[nn.Module]:
    """Forget the quantized class of ``float_cls`` (a plugin's, or a test's); returns it.

    Raises:
        KeyError: ``float_cls`` has none registered.
    """
    return _REGISTRY.pop(float_cls)


def qmodule_for(module: nn.Module, *, graph_version: int = GRAPH_VERSION) -> type[nn.Module] | None:
    """The quantized class for ``module``, or ``None`` when it has none (``graph_version`` 1: none for
    subclasses with their own forward, even equivalent ones)."""
    if isinstance(module, QuantModule):
        return None
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            same = graph_version >= 2 and _qualname(type(module)) in _SAME_FORWARD
            if cls is not type(module) and overrides_forward(module, (cls,)) and not same:
                return None
            return _REGISTRY[cls]
    return None


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class QuantModule:
    """Mixin of the quantized weight layers: fake-quantized weight and int32-grid bias."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    weight_quantizer: WeightQuantizer
    scheme: QuantScheme

    def _init_quant(self, scheme: QuantScheme, channels: int) -> None:
        self.scheme = scheme
        self.weight_quantizer = WeightQuantizer(scheme.weights, channels, grid=scheme.weight_grid)
        self.__dict__["_input_quantizer"] = None  # a reference, not a child: it lives in the graph

    @property
    def input_quantizer(self) -> ActQuantizer | None:
        return self.__dict__.get("_input_quantizer")

    def set_input_quantizer(self, quantizer: ActQuantizer | None) -> None:
        """Link the graph's quantizer of this layer's input (its scale sets the bias grid)."""
        # Plain attribute, not nn.Module.__setattr__: the quantizer must not become a child here.
        self.__dict__["_input_quantizer"] = quantizer

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    def bias_on_grid(self) -> bool:
        """Whether the bias is rounded to the int32 accumulator grid (quantized input and weight)."""
        quantizer = self.input_quantizer
        return (self.bias is not None and quantizer is not None and quantizer.mode == "quant"
                and self.weight_quantizer.enabled)

    def bias_scale(self) -> torch.Tensor:
        """Step of the int32 bias grid, ``input_scale * weight_scale`` per output channel."""
        return self.input_quantizer.scale.abs().clamp_min(1e-8) * self.weight_quantizer.scale

    def quantized_bias(self) -> torch.Tensor | None:
        if not self.bias_on_grid():
            return self.bias
        scale = self.bias_scale()
        return round_ste(self.bias / scale) * scale

    def bias_int(self) -> torch.Tensor | None:
        """The int32 bias an integer implementation adds to its accumulator (``None`` without bias)."""
        if self.bias is None or self.input_quantizer is None:
            return None
        return torch.round(self.bias.detach() / self.bias_scale().detach()).to(torch.int32)

    def _geometry(self) -> dict:
        return {}

    @torch.no_grad()
    def integer_layer(self, name: str, input_grid: str | None = None) -> IntegerLayer:
        """This layer as integers (weights frozen first if they are not yet)."""
        wq = self.weight_quantizer
        if not wq.frozen:
            wq.freeze(self.weight)
        on_grid = self.bias_on_grid()
        return IntegerLayer(
            name=name, kind=self._kind, bits=wq.bits, weight_int=wq.weight_int.clone(),
            weight_scale=wq.scale.detach().clone().float(),
            bias_int=self.bias_int() if on_grid else None,
            bias_scale=self.bias_scale().detach().clone().float() if on_grid else None,
            bias=None if on_grid or self.bias is None else self.bias.detach().clone(),
            input_grid=input_grid, **self._geometry())


def _copy_params(dst: nn.Module, src: nn.Module) -> None:
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if src.bias is not None:
            dst.bias.copy_(src.bias)
    dst.to(src.weight.device)


def _numeric_padding(conv: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """``(symmetric padding, extra zero pad in F.pad order or None)`` of a conv whose ``padding`` may be a string.

    ``"valid"`` is no padding; ``"same"`` (stride 1) is what PyTorch computes into
    ``_reversed_padding_repeated_twice``: symmetric when it can be, else the odd pixel after.
    """
    if not isinstance(conv.padding, str):
        return tuple(conv.padding), None
    pads = tuple(int(p) for p in conv._reversed_padding_repeated_twice)
    before, after = pads[0::2], pads[1::2]
    if before == after:
        return tuple(reversed(before)), None
    return (0,) * len(before), pads


class _QuantConv(QuantModule):
    """Shared body of the quantized convolutions (the float class supplies ``_conv_forward``).

    ``pre_pad`` is a zero pad (``F.pad`` order, asymmetric allowed) the layer applies to its input before
    convolving: "same" padding and explicit zero pads in front of the convolution that prepare absorbed.
    It is geometry, rebuilt by prepare, not state.
    """

    pre_pad: tuple[int, ...] | None = None

    @classmethod
    def from_float(cls, conv: nn.Module, scheme: QuantScheme, *,
                   pre_pad: tuple[int, ...] | None = None) -> "_QuantConv":
        """The quantized copy of ``conv``; ``pre_pad`` adds a zero pad of the input (zero padding mode only)."""
        padding, own_pad = _numeric_padding(conv)
        if conv.padding_mode != "zeros":  # padded by nn.Conv*d itself, see _geometry
            if pre_pad is not None:
                raise ValueError(f"`pre_pad` needs zero padding, got padding_mode={conv.padding_mode!r}")
            padding, own_pad = conv.padding, None
        if own_pad is not None and pre_pad is not None:
            pre_pad = tuple(a + b for a, b in zip(own_pad, pre_pad))
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=padding,
                dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                padding_mode=conv.padding_mode, dtype=conv.weight.dtype)
        _copy_params(q, conv)
        q._init_quant(scheme, conv.out_channels)
        if pre_pad is not None or own_pad is not None:
            q.pre_pad = tuple(pre_pad if pre_pad is not None else own_pad)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_pad is not None:
            x = F.pad(x, self.pre_pad)
        return self._conv_forward(x, self.quantized_weight(), self.quantized_bias())

    @property
    def _kind(self) -> str:
        return f"conv{self.weight.dim() - 2}d"

    def _geometry(self) -> dict:
        # as nn.Conv*d._conv_forward: a non-zero padding mode is an explicit pad before an unpadded conv
        if self.padding_mode != "zeros":
            return {"stride": tuple(self.stride), "padding": (0,) * len(self.stride), "dilation": tuple(self.dilation),
                    "groups": self.groups, "pre_pad": tuple(self._reversed_padding_repeated_twice),
                    "pre_pad_mode": self.padding_mode}
        return {"stride": tuple(self.stride), "padding": tuple(self.padding), "dilation": tuple(self.dilation),
                "groups": self.groups, "pre_pad": self.pre_pad, "pre_pad_mode": "constant"}


@register_qmodule(nn.Conv2d)
class QuantConv2d(_QuantConv, nn.Conv2d):
    """``nn.Conv2d`` with per-output-channel weight quantization."""


@register_qmodule(nn.Conv1d)
class QuantConv1d(_QuantConv, nn.Conv1d):
    """``nn.Conv1d`` with per-output-channel weight quantization."""


@register_qmodule(nn.Linear)
class QuantLinear(QuantModule, nn.Linear):
    """``nn.Linear`` with per-output-feature weight quantization."""

    @classmethod
    def from_float(cls, linear: nn.Linear, scheme: QuantScheme) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, dtype=linear.weight.dtype)
        _copy_params(q, linear)
        q._init_quant(scheme, linear.out_features)
        return q

    _kind = "linear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.quantized_bias())


def quant_layers(module: nn.Module) -> list[tuple[str, QuantModule]]:
    """The quantized weight layers of ``module``, in module order."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, QuantModule)]


def act_quantizers(module: nn.Module) -> list[tuple[str, ActQuantizer]]:
    """The activation quantizers of ``module``, in module order."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, ActQuantizer)]
