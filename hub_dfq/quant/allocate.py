"""Per-layer weight bits under a size budget: mixed precision chosen on the calibration images alone.

Each layer's *sensitivity* to ``b``-bit weights is measured, not guessed: the layer alone is rounded to ``b``
bits (second-order rounding from its own input Hessian, as the final model will be), every other layer stays
in full precision, and the KL divergence of the model's predictions from the full-precision ones is averaged
over the calibration images (ZeroQ, Cai et al. 2020, on synthetic data). Assuming the sensitivities add up,
the bits that minimise their sum under the budget are a multiple-choice knapsack, solved exactly by dynamic
programming over bytes: every budget gets a point of the Pareto frontier of size against sensitivity.

Depthwise convolutions hold few bytes and lose most at 4 bits; the allocator finds that by itself.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..progress import progress_enabled
from .blocks import partition, run_block
from .calibrate import quant_layers, quant_mode
from .gptq import HessianStats, clamp_rows, gptq_rounding, hessian_grid, layer_columns
from .observers import weight_scale
from .packing import container_bits
from .quantizers import asymmetric_at

logger = logging.getLogger(__name__)

__all__ = ["Allocation", "allocate_bits", "parse_size", "checkpoint_bytes", "layer_bytes", "BIT_CHOICES"]

BIT_CHOICES = (2, 4, 8)
_DP_UNITS = 4096  # resolution of the knapsack over bytes (sizes round up: the budget always holds)
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(value: Any, *, float_bytes: int) -> int:
    """A size budget in bytes: an int/float of bytes (a number below or equal to 1 is a ratio of ``float_bytes``),
    or a string ``"2.5MB"``, ``"900KiB"``, ``"0.15x"`` / ``"15%"`` (of the float32 checkpoint).

    Raises:
        ConfigError: not a size.
    """
    if isinstance(value, bool):
        raise ConfigError(f"size budget must be bytes or a ratio of the float checkpoint, got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ("x" if 0 < float(value) <= 1 else "")
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z%]*)\s*", str(value))
        if not match or match.group(2).lower() not in (*_UNITS, "x", "%"):
            raise ConfigError(f"size budget {value!r} is not a size: give bytes (3000000, 2.9MB, 2.8MiB) or a ratio of "
                              "the float32 checkpoint (0.16x, 16%)")
        number, unit = float(match.group(1)), match.group(2).lower()
        if unit == "" and 0 < number <= 1:
            unit = "x"
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"size budget must be positive, got {value!r}")
    if unit == "x":
        return int(number * float_bytes)
    if unit == "%":
        return int(number / 100 * float_bytes)
    return int(number * _UNITS[unit])


def layer_bytes(layer: nn.Module, bits: int) -> int:
    """Bytes of ``layer``'s packed integer weights at ``bits`` (as checkpoints store them), with an asymmetric grid's
    lowest integer per output channel (one byte each) below 8 bits."""
    packed = math.ceil(layer.weight.numel() * container_bits(bits) / 8)
    low_bytes = layer.weight_quantizer.scale.numel() if asymmetric_at(layer.scheme.weight_grid, bits) else 0
    return packed + low_bytes


def checkpoint_bytes(module: nn.Module, bits: dict[str, int] | None = None) -> int:
    """Bytes of the tensors a checkpoint of the prepared ``module`` stores, with ``bits`` (name -> weight bits,
    default each layer's own): packed integer weights plus everything else at its dtype (scales, biases, ranges,
    layers left in float)."""
    quantized = dict(quant_layers(module))
    total = 0
    for name, tensor in module.state_dict().items():
        owner, _, attr = name.rpartition(".")
        if attr == "weight" and owner in quantized:
            continue
        if attr in ("weight_int", "low") and owner.endswith("weight_quantizer"):  # counted by layer_bytes
            continue
        total += tensor.numel() * tensor.element_size()
    for name, layer in quantized.items():
        total += layer_bytes(layer, (bits or {}).get(name, layer.weight_quantizer.bits))
    return total


@dataclass
class Allocation:
    """The bits chosen for each layer and what they cost.

    Attributes:
        bits: weight bits per layer (qualified name), every quantized layer.
        bytes: checkpoint tensor bytes with these bits.
        budget: the budget asked for, in bytes.
        sensitivity: per layer, ``{bits: KL divergence}`` measured with that layer alone rounded to those bits.
        pinned: layers whose bits were fixed before allocating (first/last layer, explicit overrides).
    """

    bits: dict[str, int]
    bytes: int
    budget: int
    sensitivity: dict[str, dict[int, float]] = field(default_factory=dict)
    pinned: list[str] = field(default_factory=list)

    def overrides(self) -> dict[str, dict[str, int]]:
        """The allocation as quantization-config overrides (exact module names)."""
        return {name: {"weights": b} for name, b in self.bits.items()}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["sensitivity"] = {k: {str(b): v for b, v in s.items()} for k, s in self.sensitivity.items()}
        return data


def _kl(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float(F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(reference.float(), -1), log_target=True,
                          reduction="batchmean"))


@torch.no_grad()
def _rounded_weight(layer: nn.Module, stats: HessianStats, bits: int) -> torch.Tensor:
    """``layer``'s weight rounded to ``bits`` by GPTQ from its float inputs' Hessian (dequantized), on the grid the
    layer would have at those bits."""
    groups = 1 if not hasattr(layer, "groups") else int(layer.groups)
    w = layer.weight.detach().float().reshape(groups, layer.weight.shape[0] // groups, -1)
    symmetric = not asymmetric_at(layer.scheme.weight_grid, bits)
    start_scale = weight_scale(layer.weight, bits, method=layer.scheme.weight_observer).reshape(groups, -1) \
        if symmetric else None
    scale, qmin, qmax = hessian_grid(w, torch.diagonal(stats.hessian, dim1=1, dim2=2).float(), bits,
                                     symmetric=symmetric, scale=start_scale)
    start = gptq_rounding(w, stats.hessian, scale, qmin, qmax)
    q = clamp_rows(torch.round(start), qmin, qmax) * scale[..., None]
    return q.reshape(layer.weight.shape).to(layer.weight.dtype)


@torch.no_grad()
def measure_sensitivity(gm: fx.GraphModule, node_blocks: dict[str, str], data: torch.Tensor, *,
                        layers: Iterable[str], choices: Iterable[int] = BIT_CHOICES, batch_size: int = 32,
                        progress: bool | None = None) -> dict[str, dict[int, float]]:
    """For each layer of ``layers`` and each bit width of ``choices``: the KL divergence of the predictions on
    ``data`` from the full-precision ones with that layer alone rounded (GPTQ) to those bits."""
    layers = list(layers)
    modules = dict(quant_layers(gm))
    blocks = partition(gm, node_blocks)
    stats = {name: HessianStats() for name in layers}
    block_of: dict[str, int] = {}
    for index, block in enumerate(blocks):
        for name, _ in quant_layers(block.module):
            block_of.setdefault(name, index)
    hooks = [modules[name].register_forward_pre_hook(lambda m, args, s=stats[name]: s.update(layer_columns(m, args[0])))
             for name in layers]
    env: dict[str, torch.Tensor] = {blocks[0].inputs[0]: data}
    with quant_mode(gm, enabled=False):
        try:
            for block in blocks:  # every value of the full-precision model, kept for the reruns below
                env.update(run_block(block, env, batch_size))
        finally:
            for hook in hooks:
                hook.remove()
        reference = env[blocks[-1].outputs[-1]]
        result: dict[str, dict[int, float]] = {}
        bar = tqdm(total=len(layers) * len(tuple(choices)), desc="sensitivity", leave=False,
                   disable=not progress_enabled(progress))
        for name in layers:
            layer = modules[name]
            original = layer.weight.detach().clone()
            result[name] = {}
            for bits in choices:
                layer.weight.copy_(_rounded_weight(layer, stats[name], bits))
                rerun = dict(env)
                for block in blocks[block_of[name]:]:
                    rerun.update(run_block(block, rerun, batch_size))
                result[name][bits] = _kl(rerun[blocks[-1].outputs[-1]], reference)
                layer.weight.copy_(original)
                bar.update(1)
        bar.close()
    return result


def _knapsack(costs: list[list[float]], sizes: list[list[int]], capacity: int) -> list[int] | None:
    """Choose one option per item minimising total cost with total size <= capacity (sizes in units)."""
    inf = float("inf")
    best = [0.0] + [inf] * capacity  # best[c]: least cost of the items so far using exactly c units
    choice: list[list[int]] = []
    for item_costs, item_sizes in zip(costs, sizes):
        new = [inf] * (capacity + 1)
        picked = [-1] * (capacity + 1)
        for option, (cost, size) in enumerate(zip(item_costs, item_sizes)):
            for used in range(capacity - size, -1, -1):
                if best[used] < inf and best[used] + cost < new[used + size]:
                    new[used + size] = best[used] + cost
                    picked[used + size] = option
        best = new
        choice.append(picked)
    end = min(range(capacity + 1), key=lambda c: best[c])
    if best[end] == inf:
        return None
    options, used = [], end
    for item in range(len(costs) - 1, -1, -1):
        option = choice[item][used]
        options.append(option)
        used -= sizes[item][option]
    return options[::-1]


def check_budget(gm: nn.Module, budget: int, *, pinned: dict[str, int], choices: Iterable[int] = BIT_CHOICES,
                 float_bytes: int | None = None) -> tuple[int, int]:
    """``(smallest, largest)`` checkpoint bytes the free layers' bits can reach.

    Raises:
        ConfigError: ``budget`` is below the smallest, or above the float checkpoint (``float_bytes``).
    """
    choices = tuple(sorted(set(choices)))
    free = [name for name, _ in quant_layers(gm) if name not in pinned]
    lowest = checkpoint_bytes(gm, {**{n: choices[0] for n in free}, **pinned})
    highest = checkpoint_bytes(gm, {**{n: choices[-1] for n in free}, **pinned})
    reach = f"give {lowest:,} to {highest:,} bytes ({choices[0]} to {choices[-1]}-bit weights)"
    if budget < lowest:
        raise ConfigError(f"size budget {budget:,} bytes is below the smallest reachable checkpoint ({lowest:,} bytes, "
                          f"every free layer at {choices[0]} bits): {reach}")
    if float_bytes is not None and budget > float_bytes:
        raise ConfigError(f"size budget {budget:,} bytes is larger than the float32 checkpoint "
                          f"({float_bytes:,} bytes): {reach}")
    return lowest, highest


def allocate_bits(gm: fx.GraphModule, node_blocks: dict[str, str], data: torch.Tensor, *, budget: int,
                  pinned: dict[str, int], choices: Iterable[int] = BIT_CHOICES, batch_size: int = 32,
                  progress: bool | None = None) -> Allocation:
    """Weight bits for every quantized layer of ``gm`` so that the checkpoint fits ``budget`` bytes.

    Args:
        gm: a prepared model (its weights are restored afterwards).
        node_blocks: block of every node (from :func:`~hub_dfq.quant.prepare.prepare`).
        data: normalised calibration images (a few dozen are enough).
        budget: checkpoint tensor bytes not to exceed.
        pinned: layers whose bits are fixed (first/last layer, explicit overrides).
        choices: bit widths a layer may get.

    Raises:
        ConfigError: the budget is below what the lowest bits give or above the float checkpoint.
    """
    choices = tuple(sorted(set(choices)))
    modules = dict(quant_layers(gm))
    free = [name for name in modules if name not in pinned]
    lowest, highest = check_budget(gm, budget, pinned=pinned, choices=choices)
    if budget >= highest:
        bits = {**{n: choices[-1] for n in free}, **pinned}
        return Allocation(bits=bits, bytes=highest, budget=budget, pinned=sorted(pinned))
    sensitivity = measure_sensitivity(gm, node_blocks, data, layers=free, choices=choices, batch_size=batch_size,
                                      progress=progress)
    fixed = lowest - sum(layer_bytes(modules[n], choices[0]) for n in free)  # what no allocation changes
    room = budget - fixed
    unit = max(1, math.ceil(room / _DP_UNITS))
    sizes = [[math.ceil(layer_bytes(modules[n], b) / unit) for b in choices] for n in free]
    costs = [[sensitivity[n][b] for b in choices] for n in free]
    picked = _knapsack(costs, sizes, room // unit)
    if picked is None:  # rounding sizes up to units can make a budget just above the lowest unreachable
        picked = [0] * len(free)
    bits = {**{n: choices[i] for n, i in zip(free, picked)}, **pinned}
    allocation = Allocation(bits=bits, bytes=checkpoint_bytes(gm, bits), budget=budget, sensitivity=sensitivity,
                            pinned=sorted(pinned))
    logger.info("size budget %d bytes: %s", budget, ", ".join(f"{b}-bit x{list(bits.values()).count(b)}"
                                                             for b in choices))
    return allocation
