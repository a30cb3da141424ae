"""Work budgets sized by the device a run is on: a preset's counts are ceilings, shrunk to fit its time target.

A preset writes image and step counts for the models they were tuned on, and a target time
(:attr:`~hub_dfq.quant.registry.Preset.seconds`). Before a run, :func:`device_speed` measures what one float
forward+backward pass of one image costs on the run's device (a few passes, remembered in the cache so the
same machine plans the same budget, and so the same bytes, every time); :func:`plan_budget` then walks down a
fixed ladder of scales (``2 ** (-k / 4)``) until the run's expected time fits the target. On a GPU that is
20x faster than a CPU, ``fast`` keeps its written counts for models a CPU must shrink them for.

Counts the caller gives explicitly are never changed; with an explicit ``time_budget`` that even the smallest
counts cannot meet, :func:`plan_budget` raises instead of running for longer than asked.

``shrink`` and :data:`REFERENCE_GFLOPS` size the stand-alone ``synthesize`` defaults by a model's FLOPs.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass
from typing import Callable

from .errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["REFERENCE_GFLOPS", "cost_ratio", "shrink", "DeviceSpeed", "device_speed", "BudgetPlan", "plan_budget",
           "parse_duration", "LADDER"]

# ResNet-44 at 32 px costs 0.19 GFLOP per image: every CIFAR ResNet keeps its budgets as written.
REFERENCE_GFLOPS = 0.25
# scales a budget may take: 19% apart, so a device a few percent faster or slower plans the same counts
LADDER = tuple(2.0 ** (-k / 4) for k in range(33))


def cost_ratio(gflops: float) -> float:
    """How many times a model's forward pass costs more than the reference (at least 1)."""
    return max(1.0, gflops / REFERENCE_GFLOPS)


def shrink(value: int, gflops: float, *, floor: int, multiple: int = 1) -> int:
    """``value`` divided by the cost ratio of a ``gflops`` model, rounded down to ``multiple``, at least ``floor``
    (and never more than ``value``)."""
    ratio = cost_ratio(gflops)
    if ratio == 1.0:
        return value
    return min(value, max(floor, int(value / ratio) // multiple * multiple))


def scaled_count(value: int, scale: float, *, floor: int, multiple: int = 1) -> int:
    """``value * scale`` rounded down to ``multiple``, at least ``floor`` and at most ``value``."""
    if scale >= 1.0:
        return value
    return min(value, max(floor, int(value * scale) // multiple * multiple))


def parse_duration(value: str | float | int) -> float:
    """Seconds from ``900``, ``"900s"``, ``"15m"``, ``"1.5h"`` or ``"1h30m"``.

    Raises:
        ConfigError: not a positive duration.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m(?:in)?)?\s*(?:(\d+(?:\.\d+)?)s?)?", text)
        if not text or parts is None or not any(parts.groups()):
            raise ConfigError(f"time budget {value!r} is not a duration: give seconds (900) or 15m, 1h, 1h30m")
        hours, minutes, secs = (float(g) if g else 0.0 for g in parts.groups())
        seconds = 3600 * hours + 60 * minutes + secs
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"time budget must be a positive duration, got {value!r}")
    return seconds


@dataclass(frozen=True)
class DeviceSpeed:
    """What one float forward+backward pass of one image costs a model on a device.

    Attributes:
        device: the device, in words (``"cpu (2 threads)"``, ``"cuda (NVIDIA H100 80GB HBM3)"``).
        seconds_per_image: seconds of one forward+backward pass of one image at the model's input size.
        synthesis_step: seconds of one synthesis step of one image, where a run synthesises its calibration images
            (:func:`hub_dfq.synth.speed.synthesis_step_seconds`); ``None`` otherwise.
    """

    device: str
    seconds_per_image: float
    synthesis_step: float | None = None

    def to_dict(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if v is not None}


_SPEEDS: dict[str, float] = {}  # measurements this process took or read


def _device_name(device) -> str:
    import torch  # why: `import hub_dfq` (which reads the presets) stays free of torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return device.type


def measured_once(what: str, model, measure: Callable[[], float], *, field: str, **key: object) -> float:
    """``measure()`` (seconds of some unit of work of ``model`` where it is), measured once per ``what``, model shape,
    device, thread count and ``key``; then read from the cache, so that the same machine plans the same counts (and
    so the same bytes) every time.

    Args:
        what: the measurement, in words (``"device speed"``); the cache entry's ``kind``.
        model: a :class:`~hub_dfq.models.VisionModel`, on the device to measure.
        measure: takes the measurement (positive seconds).
        field: the name the value is saved under (``"seconds_per_image"``).
        key: what else the measurement depends on (a synthesis method, a precision).
    """
    # why here: `import hub_dfq` reads this module (the presets' ladder) and stays free of the cache's writers
    from .cache import cache_root, record_entry
    from .fingerprint import fingerprint
    from .outputs import write_text

    name = _device_name(model.device)
    cache_key = fingerprint(what.replace(" ", "-"), version=1, device=name, architecture=model.source.architecture,
                            parameters=model.num_parameters(), input_size=list(model.input_size), **key)
    if cache_key in _SPEEDS:
        return _SPEEDS[cache_key]
    path = cache_root("speed") / f"{cache_key}.json"
    try:
        value = float(json.loads(path.read_text())[field])
    except (OSError, ValueError, KeyError, TypeError):
        value = math.nan
    if not value > 0:  # also NaN: absent, unreadable or damaged
        value = measure()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            record_entry("speed", path)  # first: `hub-dfq cache clear` deletes only what it has a record of
            write_text(path, json.dumps({"kind": what, "device": name, field: value,
                                         "architecture": model.source.architecture, **key}) + "\n")
        except OSError as err:  # a read-only cache only costs a re-measurement next time
            logger.debug("could not save the %s to %s: %s", what, path, err)
    _SPEEDS[cache_key] = value
    return value


def probe_batch(device) -> int:
    """The batch a speed probe measures on ``device``: enough to fill a GPU, small enough to be quick on a CPU."""
    return 32 if device.type == "cuda" else 8


def median_seconds(times: list[float]) -> float:
    """The median of ``times`` (the upper one of an even count): one slow pass does not move a plan."""
    ordered = sorted(times)
    return ordered[len(ordered) // 2]


def device_speed(model, *, batch_size: int | None = None, repeats: int = 3) -> DeviceSpeed:
    """Measure (once per model shape, device and thread count; then read from the cache) what one image's
    forward+backward pass costs ``model`` (a :class:`~hub_dfq.models.VisionModel`) where it is."""
    import torch  # why: `import hub_dfq` (which reads the presets) stays free of torch

    device = model.device
    batch = batch_size or probe_batch(device)

    def measure() -> float:
        x = model.example_input(batch).normal_(generator=torch.Generator(device).manual_seed(0))
        times = []
        for _ in range(repeats + 1):  # the first pass pays for allocation and kernel selection
            inputs = x.clone().requires_grad_(True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model.module(inputs).float().sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        model.module.zero_grad(set_to_none=True)
        return median_seconds(times[1:]) / batch

    seconds = measured_once("device speed", model, measure, field="seconds_per_image")
    return DeviceSpeed(_device_name(device), seconds)


@dataclass(frozen=True)
class BudgetPlan:
    """The budget a run chose and what it expects to take.

    Attributes:
        scale: the ladder step the written counts were multiplied by (1.0: as written).
        counts: ``{what: count}`` as the run uses them (images, synthesis steps, each algorithm's steps).
        expected_seconds: the expected time of synthesis, calibration and the algorithm.
        target_seconds: the time the budget had to fit.
        speed: the measured device speed it was planned from.
    """

    scale: float
    counts: dict[str, int]
    expected_seconds: float
    target_seconds: float
    speed: DeviceSpeed

    def describe(self) -> str:
        counts = ", ".join(f"{k} {v:,}" for k, v in self.counts.items())
        shrunk = "" if self.scale >= 1.0 else \
            f" (x{self.scale:.2g} of the written counts to fit {_minutes(self.target_seconds)})"
        synthesis = "" if self.speed.synthesis_step is None else \
            f", {1e3 * self.speed.synthesis_step:.1f} ms per image synthesis step"
        return (f"budget: {counts}{shrunk}; expected about {_minutes(self.expected_seconds)} on {self.speed.device} "
                f"({1e3 * self.speed.seconds_per_image:.1f} ms per image forward+backward{synthesis})")

    def to_dict(self) -> dict[str, object]:
        return {"scale": self.scale, "counts": dict(self.counts), "expected_seconds": round(self.expected_seconds, 1),
                "target_seconds": self.target_seconds, "speed": self.speed.to_dict()}


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def plan_budget(cost: Callable[[float], tuple[float, dict[str, int]]], *, speed: DeviceSpeed, target_seconds: float,
                strict: bool) -> BudgetPlan:
    """The largest ladder scale whose expected time fits ``target_seconds``.

    Args:
        cost: ``scale -> (forward+backward image passes, counts)`` of the run at that scale.
        speed: the device's measured speed.
        target_seconds: the time to fit.
        strict: raise when even the smallest scale does not fit (an explicit time budget); otherwise plan the
            smallest scale and log a warning.

    Raises:
        ConfigError: ``strict`` and the smallest budget needs more than ``target_seconds``.
    """
    for scale in LADDER:
        passes, counts = cost(scale)
        expected = passes * speed.seconds_per_image
        if expected <= target_seconds:
            plan = BudgetPlan(scale, counts, expected, target_seconds, speed)
            logger.info("%s", plan.describe())
            return plan
    message = (f"the smallest budget ({', '.join(f'{k} {v:,}' for k, v in counts.items())}) needs about "
               f"{_minutes(expected)} on {speed.device}, more than the {_minutes(target_seconds)} given")
    if strict:
        raise ConfigError(message + f": give a time budget of at least {math.ceil(expected)} s, fewer calibration "
                          "images or steps, or a faster device")
    logger.warning("%s; running it anyway", message)
    plan = BudgetPlan(scale, counts, expected, target_seconds, speed)
    logger.info("%s", plan.describe())
    return plan
