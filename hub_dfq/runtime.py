"""Where work runs: one device and precision decision made at the top and passed down.

Every verb takes ``device=`` (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``);
:func:`resolve_device` turns it into a ``torch.device`` once, with a clear error for a device that
does not exist, and :func:`fast_bf16` says whether bfloat16 arithmetic is natively fast there.
"""

from __future__ import annotations

import functools

import torch

from .errors import ConfigError

__all__ = ["DEVICE_CHOICES", "resolve_device", "fast_bf16", "resolve_precision", "place_model"]

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The ``torch.device`` to run on: ``"auto"`` (or ``None``) takes CUDA when present, else the CPU.

    Raises:
        ConfigError: an unknown spelling, or a device this machine does not have.
    """
    if device is None or device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"unknown device {device!r}: use {DEVICE_CHOICES}") from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} was asked for, but this machine has no usable CUDA GPU "
                              "(torch.cuda.is_available() is False): use `device='cpu'` or `device='auto'`")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ConfigError(f"device {device!r} does not exist: this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}")
    elif resolved.type != "cpu":
        raise ConfigError(f"device type {resolved.type!r} is not supported: use {DEVICE_CHOICES}")
    return resolved


@functools.lru_cache(maxsize=None)
def _cpu_has_fast_bf16() -> bool:
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        return False
    if capability not in ("AVX512", "AMX"):
        return False
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:  # not Linux: no way to tell, so stay in float32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fast_bf16(device: torch.device | str | None = None) -> bool:
    """Whether bf16 arithmetic is natively fast on ``device`` (default: where ``"auto"`` would run).

    CUDA devices with bf16 support, and CPUs with AVX512-BF16 or AMX.
    """
    device = resolve_device(device if device is not None else "auto")
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return _cpu_has_fast_bf16()


def resolve_precision(precision: str, device: torch.device | str | None = None) -> str:
    """``"fp32"`` or ``"bf16"``: ``precision`` itself, or for ``"auto"`` bf16 where it is natively fast on
    ``device``."""
    if precision != "auto":
        return precision
    return "bf16" if fast_bf16(device) else "fp32"


def place_model(model, device: torch.device | str | None):
    """Move ``model`` (anything with ``.to`` and ``.device``) to ``device`` in place; ``None`` leaves it where it is.

    Raises:
        ConfigError: a device this machine does not have.
    """
    if device is None:
        return model
    target = resolve_device(device)
    if model.device != target:
        model.to(target)
    return model
