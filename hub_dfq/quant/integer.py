"""The integer model as plain data: what a backend needs to run a quantized model with integer kernels.

:class:`IntegerLayer` is one convolution or linear layer as integers (``int8`` weights on a
per-output-channel grid, an ``int32`` bias on the accumulator grid ``input_scale * weight_scale``)
and its geometry; :class:`ActivationGrid` is one activation quantizer (scale, zero point, integer
range). :meth:`hub_dfq.quant.model.QuantizedModel.integer_layers`,
:meth:`~hub_dfq.quant.model.QuantizedModel.activation_grids` and
:meth:`~hub_dfq.quant.model.QuantizedModel.lower` expose them, so a backend never reads quantizer
attributes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["IntegerLayer", "ActivationGrid"]


@dataclass(frozen=True)
class IntegerLayer:
    """One quantized convolution or linear layer, as integers.

    Attributes:
        name: qualified module name in the quantized graph.
        kind: ``"linear"``, ``"conv1d"`` or ``"conv2d"``.
        bits: weight bit width (the integers lie in ``[-(2^(bits-1)-1), 2^(bits-1)-1]``, or below 8 bits on an
            asymmetric grid in ``[low, low + 2^bits - 1]`` per channel, ``low <= 0``: plain int8 with zero point 0).
        weight_int: ``int8`` weights, the float layer's shape.
        weight_scale: ``float32`` step per output channel.
        bias_int: ``int32`` bias on the ``bias_scale`` grid, or ``None`` (no bias, or a float bias).
        bias_scale: ``input_scale * weight_scale`` per output channel, when ``bias_int`` is set.
        bias: the float bias when it is not on the integer grid (input not quantized), else ``None``.
        stride, padding, dilation, groups: the convolution's geometry (``None`` for linear layers);
            ``padding`` is symmetric zero padding done by the convolution itself.
        pre_pad: explicit padding applied before the convolution (``F.pad`` order: last dimension
            first, ``(left, right, top, bottom)`` for 2-D), for non-zero padding modes and
            asymmetric ("same") padding; ``None`` if there is none.
        pre_pad_mode: ``"constant"`` (zeros), ``"reflect"``, ``"replicate"`` or ``"circular"``.
        input_grid: name of the :class:`ActivationGrid` that quantizes this layer's input, if any.
    """

    name: str
    kind: str
    bits: int
    weight_int: torch.Tensor
    weight_scale: torch.Tensor
    bias_int: torch.Tensor | None
    bias_scale: torch.Tensor | None
    bias: torch.Tensor | None
    stride: tuple[int, ...] | None = None
    padding: tuple[int, ...] | None = None
    dilation: tuple[int, ...] | None = None
    groups: int = 1
    pre_pad: tuple[int, ...] | None = None
    pre_pad_mode: str = "constant"
    input_grid: str | None = None

    @property
    def is_conv(self) -> bool:
        return self.kind.startswith("conv")

    def dequantized_weight(self) -> torch.Tensor:
        """``weight_int * weight_scale`` in float32: the weight the simulation computes with."""
        shape = [-1] + [1] * (self.weight_int.dim() - 1)
        return self.weight_int.to(torch.float32) * self.weight_scale.view(shape)


@dataclass(frozen=True)
class ActivationGrid:
    """One activation quantizer: values become ``clamp(round(x / scale) + zero_point, qmin, qmax)``.

    Attributes:
        name: its module name in the quantized graph.
        scale: the step (float32, positive).
        zero_point: the integer that represents 0.
        qmin, qmax: the integer range (``0 .. 2^bits - 1``).
        bits: bit width.
        signed: the tensor can be negative (asymmetric grid with a zero point); ``False`` after a ReLU.
    """

    name: str
    scale: float
    zero_point: int
    qmin: int
    qmax: int
    bits: int
    signed: bool
