"""TensorFlow "same" padding, as timm's ``Conv2dSame`` computes it at every call.

TF-ported timm models (``tf_efficientnet*``, ``tf_mobilenetv3*``, ...) pad asymmetrically (the odd pixel goes
right and bottom). A classifier's input size is fixed, so these pads are constants; the quantized graph and
the synthesis loop both turn them into static pads, from this one rule.
"""

from __future__ import annotations

import math
from typing import Sequence

from torch import nn

from .adapters import tracing_hints

__all__ = ["same_pads", "same_padded_types"]


def same_pads(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
              dilation: Sequence[int]) -> tuple[int, ...]:
    """TensorFlow "same" pads of a convolution over a ``size`` input, in ``F.pad`` order (last dimension first).

    Every dimension gets ``max((ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)`` pixels, the odd one after.
    """
    pads: list[int] = []
    for n, k, s, d in reversed(list(zip(size, kernel, stride, dilation))):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


def same_padded_types() -> tuple[type[nn.Module], ...]:
    """The layer classes that pad their own input "same" at every call, in any registered model family
    (each family's :class:`~hub_dfq.models.adapters.TracingHints`: timm's ``Conv2dSame``)."""
    return tracing_hints().same_padded
