"""Sub-byte packing of integer weights: 4 bits and lower take a nibble, 2 bits and lower a crumb."""

from __future__ import annotations

import torch

__all__ = ["container_bits", "pack", "unpack"]


def container_bits(bits: int) -> int:
    """Bits of storage per value: 2 for 1-2-bit, 4 for 3-4-bit, 8 above."""
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def _row_offsets(values_shape, low: torch.Tensor | None, width: int) -> torch.Tensor | int:
    """What turns stored unsigned values back into integers: ``low`` per row (dim 0), else the signed offset."""
    if low is None:
        return -(1 << (width - 1))
    rows = int(values_shape[0])
    per_row = 1
    for size in values_shape[1:]:
        per_row *= int(size)
    return low.reshape(rows, 1).to(torch.int16).expand(rows, per_row).reshape(-1)


def pack(values: torch.Tensor, bits: int, *, low: torch.Tensor | None = None) -> torch.Tensor:
    """Integers -> flat ``uint8`` (``int8`` unchanged above 4 bits).

    Values are signed in ``[-2^(bits-1), 2^(bits-1))``, or with ``low`` (one integer per row of dim 0, an
    asymmetric grid's lowest) in ``[low, low + 2^bits)``; they are stored unsigned (``value - low``, or offset by
    half the container) and the first value of each byte goes to its low bits.
    """
    width = container_bits(bits)
    flat = values.detach().reshape(-1).to(torch.int16)
    if width == 8:
        return flat.to(torch.int8)
    per_byte = 8 // width
    unsigned = (flat - _row_offsets(values.shape, low, width)).to(torch.uint8)
    pad = (-unsigned.numel()) % per_byte
    if pad:
        unsigned = torch.cat([unsigned, unsigned.new_zeros(pad)])
    groups = unsigned.view(-1, per_byte).to(torch.int32)
    packed = torch.zeros(groups.shape[0], dtype=torch.int32)
    for i in range(per_byte):
        packed |= groups[:, i] << (i * width)
    return packed.to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, shape: torch.Size | tuple[int, ...], *,
           low: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`pack` (with the same ``low``): ``int8`` tensor of ``shape``."""
    width = container_bits(bits)
    numel = 1
    for size in shape:
        numel *= int(size)
    if width == 8:
        return packed.to(torch.int8).reshape(shape)
    per_byte = 8 // width
    mask = (1 << width) - 1
    data = packed.to(torch.int32)
    parts = [((data >> (i * width)) & mask) for i in range(per_byte)]
    values = torch.stack(parts, dim=1).reshape(-1)[:numel] + _row_offsets(shape, low, width)
    return values.to(torch.int8).reshape(shape)
