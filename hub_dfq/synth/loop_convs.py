"""The synthesis loop's convolutions: a precision per layer and static "same" padding.

Measured on one AVX-512 (bf16) CPU thread with EfficientNet-Lite0 at 224 px (``scripts/bench_synth.py``):

- oneDNN's bf16 depthwise convolution is fast at stride 1 but 3-10x slower than float32 at stride 2
  (its backward), so with ``precision="bf16"`` the strided depthwise convs run in float32 on a CPU and
  every other conv in bf16.
- timm's ``Conv2dSame`` pads every input with ``F.pad``: a padded copy forward, a padded-size gradient
  backward. A depthwise conv with pads ``(p, p + 1)`` equals one whose kernel has a leading row/column of
  zeros and symmetric pads ``p + 1`` (exactly: the extra taps multiply zeros), which needs no copy; dense
  convs (the stem) keep an explicit pad.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.same_padding import same_padded_types, same_pads

__all__ = ["LoopConv2d", "prepare_loop_convs"]


class LoopConv2d(nn.Module):
    """A frozen 2-D convolution in a fixed dtype, with TF "same" padding made static.

    Its input is cast to ``dtype`` (a no-op when it already is) and it runs outside autocast, so a float32
    layer stays float32 inside a bf16-autocast loop.
    """

    def __init__(self, conv: nn.Conv2d, dtype: torch.dtype, tf_same: bool):
        super().__init__()
        self.register_buffer("weight", conv.weight.detach().to(dtype).contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().to(dtype))
        self.stride, self.dilation, self.groups = tuple(conv.stride), tuple(conv.dilation), conv.groups
        self.padding = conv.padding
        self.tf_same = tf_same
        self.dtype = dtype
        self.depthwise = conv.groups > 1 and conv.groups == conv.in_channels
        self._grown: dict[tuple[int, int], torch.Tensor] = {}

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, padding) -> torch.Tensor:
        return F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)

    def _grown_weight(self, dh: int, dw: int) -> torch.Tensor:
        """The kernel with ``dh`` leading zero rows and ``dw`` leading zero columns."""
        if (dh, dw) not in self._grown:
            self._grown[dh, dw] = F.pad(self.weight, (dw, 0, dh, 0)).contiguous(memory_format=torch.channels_last)
        return self._grown[dh, dw]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        with torch.autocast(x.device.type, enabled=False):
            if not self.tf_same:
                return self._conv(x, self.weight, self.padding)
            left, right, top, bottom = same_pads(x.shape[-2:], self.weight.shape[-2:], self.stride, self.dilation)
            if top == bottom and left == right:
                return self._conv(x, self.weight, (top, left))
            if self.depthwise and self.dilation == (1, 1) and bottom - top <= 1 and right - left <= 1:
                return self._conv(x, self._grown_weight(bottom - top, right - left), (bottom, right))
            return self._conv(F.pad(x, (left, right, top, bottom)), self.weight, 0)


def _slow_in_bf16(conv: nn.Conv2d, device: torch.device) -> bool:
    """Strided depthwise convs: oneDNN's bf16 kernels (backward) are 3-10x slower than float32 on a CPU."""
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels
    return device.type == "cpu" and depthwise and max(conv.stride) > 1


def prepare_loop_convs(module: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """Replace (in place) the 2-D convs of the loop's frozen model copy by :class:`LoopConv2d` where it helps.

    With ``precision="bf16"`` the strided depthwise convs on a CPU stay float32; every ``Conv2dSame`` gets
    static pads in its dtype. Plain convs in their final dtype and convs of other subclasses (weight
    transforms) are left as they are.
    """
    same_types = same_padded_types()
    low = precision == "bf16"
    for name, sub in list(module.named_modules()):
        if not isinstance(sub, nn.Conv2d) or getattr(sub, "padding_mode", "zeros") != "zeros":
            continue
        tf_same = type(sub) in same_types
        if type(sub) is not nn.Conv2d and not tf_same:
            continue
        dtype = torch.bfloat16 if low and not _slow_in_bf16(sub, device) else torch.float32
        if not tf_same and (not low or dtype == torch.bfloat16):
            continue  # a plain layer: the caller casts it to bf16, or it stays float32
        module.set_submodule(name, LoopConv2d(sub, dtype, tf_same))
    return module
