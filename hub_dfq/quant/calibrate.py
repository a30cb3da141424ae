"""Post-training calibration: weight scales from the weights, activation ranges from data.

Also the switches every later stage uses: :func:`quant_mode` turns quantization off (the folded
full-precision model, the teacher of reconstruction and distillation) or on, and
:func:`freeze_weights` fixes the integer weights.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..progress import progress_enabled
from .modules import act_quantizers, quant_layers
from .observers import activation_range, new_collector, weight_grid

logger = logging.getLogger(__name__)

__all__ = ["quant_mode", "calibrate_weights", "observe_activations", "calibrate_activations", "freeze_weights",
           "iter_tensor_batches", "quant_layers", "act_quantizers"]


@contextmanager
def quant_mode(module: nn.Module, *, enabled: bool) -> Iterator[None]:
    """Turn every weight and activation quantizer of ``module`` off (or on) inside the block."""
    saved = [(q, q.mode) for _, q in act_quantizers(module)]
    saved_w = [(m.weight_quantizer, m.weight_quantizer.enabled) for _, m in quant_layers(module)]
    for q, _ in saved:
        q.mode = "quant" if enabled else "off"
    for wq, _ in saved_w:
        wq.enabled = enabled
    try:
        yield
    finally:
        for q, mode in saved:
            q.mode = mode
        for wq, state in saved_w:
            wq.enabled = state


def iter_tensor_batches(data: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(data), batch_size):
        yield data[start:start + batch_size]


@torch.no_grad()
def calibrate_weights(module: nn.Module) -> None:
    """Set every weight quantizer's per-channel scales with its scheme's observer (minmax or MSE)."""
    for _, layer in quant_layers(module):
        wq = layer.weight_quantizer
        wq.set_grid(*weight_grid(layer.weight, wq.bits, method=layer.scheme.weight_observer, symmetric=wq.symmetric))


@contextmanager
def observe_activations(module: nn.Module, *, seed: int = 0) -> Iterator[None]:
    """Inside the block, forward passes of ``module`` run in full precision and feed every activation
    quantizer's observer; on a normal exit each quantizer's range is set from what it saw.

    Args:
        module: a prepared model.
        seed: seed of the observers' value sampling.

    Raises:
        ValueError: (on exit) a quantizer saw no values (the data never reached it).
    """
    quantizers = act_quantizers(module)
    for i, (_, q) in enumerate(quantizers):
        q.observer = new_collector(q.observer_method, seed=seed + i)
    try:
        with torch.no_grad(), quant_mode(module, enabled=False):
            for _, q in quantizers:
                q.mode = "observe"
            yield
        with torch.no_grad():
            for name, q in quantizers:
                low, high = activation_range(q.observer, q.bits, signed=q.signed, method=q.observer_method,
                                             percentile=q.percentile)
                q.set_range(low, high)
                logger.debug("%s: range [%.4g, %.4g], scale %.4g, zero point %d", name, *q.range(),
                             float(q.scale), int(q.zero_point))
    finally:  # an interrupted pass leaves no half-filled observers behind
        for _, q in quantizers:
            q.observer = None


@torch.no_grad()
def calibrate_activations(module: nn.Module, data: torch.Tensor, *, batch_size: int = 64, seed: int = 0,
                          progress: bool = False) -> None:
    """Observe every activation quantizer's input on ``data`` (full-precision pass) and set its range.

    Args:
        module: a prepared model.
        data: normalised inputs ``(N, C, H, W)``.
        batch_size: images per forward pass.
        seed: seed of the observers' value sampling.
        progress: show a progress bar.

    Raises:
        ValueError: a quantizer saw no values (the data never reached it).
    """
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    with observe_activations(module, seed=seed):
        for batch in tqdm(list(iter_tensor_batches(data, batch_size)), desc="calibrate",
                          disable=not progress_enabled(progress), leave=False):
            module(batch.to(device))


@torch.no_grad()
def freeze_weights(module: nn.Module) -> None:
    """Fix the integer weights of every quantized layer (hard rounding)."""
    for _, layer in quant_layers(module):
        layer.weight_quantizer.freeze(layer.weight)


def run_calibrate(context) -> dict:
    """The ``calibrate`` algorithm: the ranges :func:`hub_dfq.quantize` set are the result; nothing more."""
    return {}
