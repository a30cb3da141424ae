"""What one synthesis step of one image costs a model where it is, measured on the real optimisation loop.

Budgets (:mod:`hub_dfq.budget`) are planned in float forward+backward passes, but a synthesis step is not a fixed
number of them: it runs bf16 where the hardware has it, fuses each BN with its loss and stops after the last BN,
and how much all that saves depends on the machine (EfficientNet-Lite0 at 224 px, 2 CPU threads: 0.24 of a pass
on one Xeon, 0.38 on another). So the loop itself is timed, on a few steps of a small batch: its cost
per image is flat from 8 to 128 images on a CPU (35 ms per image-step at 8, 32 and 128 on Lite0).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from ..budget import measured_once, median_seconds, probe_batch
from ..models.vision_model import VisionModel
from .config import SynthConfig
from .generator import BatchGenerator

__all__ = ["synthesis_step_seconds"]


def synthesis_step_seconds(model: VisionModel, config: SynthConfig, *, batch_size: int | None = None,
                           steps: int = 3) -> float:
    """Seconds one optimisation step of one image costs ``config``'s method on ``model`` (on its device), measured
    once per model shape, device, thread count, method, BN loss and precision, then read from the cache."""
    batch = batch_size or probe_batch(model.device)

    def measure() -> float:
        probe = dataclasses.replace(config, num_images=batch, batch_size=batch, iters=steps + 1)
        stamps: list[float] = []
        # each step ends by reading its loss (a device sync); the first pays for allocation and kernel selection
        BatchGenerator(model, probe).generate(torch.zeros(batch, dtype=torch.long), torch.Generator().manual_seed(0),
                                              on_step=lambda step, loss: stamps.append(time.perf_counter()))
        return median_seconds([b - a for a, b in zip(stamps, stamps[1:])]) / batch

    return measured_once("synthesis speed", model, measure, field="seconds_per_image_step", method=config.method,
                         loss=config.loss, precision=config.precision)
