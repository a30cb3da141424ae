"""What a model's numbers must satisfy before any work uses them: finite weights, sane BN statistics.

A NaN in one weight does not stop a forward pass: it spreads silently into a quantization scale, an
accuracy, an audit score of ``inf`` or a synthesis that "diverges". Models are checked once, where
they are loaded (and where the API receives one it did not load), with one line naming the first
bad tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError

__all__ = ["check_finite", "check_bn_statistics", "check_model_numbers", "check_stored_dtypes"]


def _first_bad(tensor: torch.Tensor) -> tuple[int, float] | None:
    bad = ~torch.isfinite(tensor.detach())
    if not bad.any():
        return None
    index = int(bad.reshape(-1).nonzero()[0])
    return index, float(tensor.detach().reshape(-1)[index])


def check_finite(tensors: Any, *, spec: str, what: str = "weights") -> None:
    """Refuse the first floating-point tensor of ``tensors`` (a module or a ``name -> tensor`` dict) holding NaN/Inf.

    Raises:
        CheckpointError: naming the tensor, the element and its value.
    """
    items = tensors.state_dict().items() if isinstance(tensors, nn.Module) else tensors.items()
    for name, tensor in items:
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            continue
        found = _first_bad(tensor)
        if found is not None:
            index, value = found
            raise CheckpointError(f"{spec}: tensor {name} holds {value} (element {index} of {tensor.numel()}): the "
                                  f"{what} are damaged, and nothing computed from them would mean anything; download "
                                  "or save the model again")


def check_bn_statistics(module: nn.Module, *, spec: str) -> None:
    """Refuse BatchNorm running statistics that no training produces: non-finite means or variances, negative
    variances.

    Raises:
        CheckpointError: naming the layer's buffer.
    """
    for name, layer in module.named_modules():
        mean, var = getattr(layer, "running_mean", None), getattr(layer, "running_var", None)
        if not isinstance(var, torch.Tensor) or not isinstance(mean, torch.Tensor):
            continue
        check_finite({f"{name}.running_mean": mean, f"{name}.running_var": var}, spec=spec, what="BN statistics")
        negative = (var.detach() < 0).nonzero()
        if len(negative):
            index = int(negative[0])
            raise CheckpointError(f"{spec}: {name}.running_var[{index}] is {float(var.reshape(-1)[index])}, a "
                                  "negative variance: the BN statistics are damaged; download or save the model again")


def check_model_numbers(module: nn.Module, *, spec: str) -> None:
    """:func:`check_bn_statistics` then :func:`check_finite` over every weight and buffer of ``module``."""
    check_bn_statistics(module, spec=spec)
    check_finite(module, spec=spec)


def check_stored_dtypes(folder: Path, module: nn.Module, *, spec: str) -> None:
    """Refuse a ``.safetensors`` file that stores a floating-point weight of ``module`` as integers or booleans.

    why: ``load_state_dict`` casts silently, so weights saved as int32 (a conversion script gone wrong) loaded as
    whole numbers, mostly 0, and every accuracy computed from them looked like a real, bad result.

    Raises:
        CheckpointError: naming the tensor and the stored dtype.
    """
    from safetensors import safe_open  # why: only folders with safetensors files pay for the import

    expected = {name: tensor for name, tensor in module.state_dict().items() if tensor.is_floating_point()}
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    if name not in expected:
                        continue
                    stored = handle.get_slice(name).get_dtype()
                    if not stored.startswith(("F", "BF")):  # F16, F32, F64, BF16, F8_*
                        raise CheckpointError(f"{spec}: {file.name} stores {name} as {stored}, but it is a "
                                              "floating-point weight: the file was converted wrongly; download or "
                                              "save the model again")
        except CheckpointError:
            raise
        except Exception:  # noqa: BLE001 - unreadable files were refused (or loaded) by the adapter already
            continue
