"""Sub-byte packing of integer weights: 4 bits and lower take a nibble, 2 bits and lower a crumb."""

from __future__ import annotations

import torch

__all__ = ["container_bits", "pack", "unpack"]


def container_bits(bits: int) -> int:
    """Bits of storage per value: 2 for 1-2-bit, 4 for 3-4-bit, 8 above."""
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed integers in ``[-2^(bits-1), 2^(bits-1))`` -> flat ``uint8`` (``int8`` unchanged at 8 bits).

    Values are offset to unsigned and the first value of each byte goes to its low bits.
    """
    width = container_bits(bits)
    flat = values.detach().reshape(-1).to(torch.int16)
    if width == 8:
        return flat.to(torch.int8)
    per_byte = 8 // width
    offset = 1 << (width - 1)
    unsigned = (flat + offset).to(torch.uint8)
    pad = (-unsigned.numel()) % per_byte
    if pad:
        unsigned = torch.cat([unsigned, unsigned.new_zeros(pad)])
    groups = unsigned.view(-1, per_byte).to(torch.int32)
    packed = torch.zeros(groups.shape[0], dtype=torch.int32)
    for i in range(per_byte):
        packed |= groups[:, i] << (i * width)
    return packed.to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack`: ``int8`` tensor of ``shape``."""
    width = container_bits(bits)
    numel = 1
    for size in shape:
        numel *= int(size)
    if width == 8:
        return packed.to(torch.int8).reshape(shape)
    per_byte = 8 // width
    offset = 1 << (width - 1)
    mask = (1 << width) - 1
    data = packed.to(torch.int32)
    parts = [((data >> (i * width)) & mask) for i in range(per_byte)]
    values = torch.stack(parts, dim=1).reshape(-1)[:numel] - offset
    return values.to(torch.int8).reshape(shape)
