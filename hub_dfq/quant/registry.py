"""Quantization algorithms, observers and presets: one descriptor each, and the registries every listing reads.

- An **algorithm** is what happens after calibration (``calibrate``: nothing more; ``reconstruct``:
  block-wise AdaRound + LSQ; ``distill``: knowledge distillation): a function over an
  :class:`~hub_dfq.quant.algorithms.AlgorithmContext` plus the dataclass of its settings.
- An **observer** chooses the range a quantizer covers (per-channel weight scales, or an activation
  interval from streamed samples).
- A **preset** is a speed/accuracy budget: calibration images, synthesis options and the settings
  of each algorithm.

:func:`hub_dfq.quantize`, :class:`~hub_dfq.quant.config.QuantScheme`'s checks, the model card, the
resume-cache keys, the CLI choices and the docs table all read these. A new algorithm is one module
(its run function and settings) plus one :func:`register_algorithm` call, also from outside the package.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

from ..budget import scaled_count
from ..registry import Registry

# the synthesis method quantize calibrates with when given no data. BNS with image priors: on EfficientNet-Lite0 W4A8
# (GPTQ, 96 images x 84 steps, all 500 shared images) the rough, noise-like BNS images lose 6.5 points (two seeds),
# the smooth bns+p images 4.3 (three seeds), real images 3.2; BNS's loss is in GPTQ's input Hessians (ranges from BNS
# images with Hessians from real ones: -2.8). Neutral on the CIFAR ResNets. docs/imagenet.md, "Smoother synthetic
# images".
DEFAULT_CALIBRATION = "bns+p"

# Integer grids of weights below 8 bits. "asymmetric" (the default): each output channel's integers span [low,
# low + 2^b - 1] over its own range, zero exact; "symmetric": the narrow range around zero. Lite0 W4A8 data-free:
# -4.3 -> -3.1 points (three synthetic sets, each paired); neutral on the CIFAR ResNets. docs/imagenet.md,
# "Asymmetric weight grids".
WEIGHT_GRIDS = ("asymmetric", "symmetric")

__all__ = [
    "QuantAlgorithm", "QUANT_ALGORITHMS", "register_algorithm",
    "Observer", "WEIGHT_OBSERVERS", "ACT_OBSERVERS", "register_observer",
    "Preset", "PRESETS", "register_preset", "DEFAULT_CALIBRATION",
]


@dataclass(frozen=True)
class QuantAlgorithm:
    """One quantization algorithm.

    Args:
        name: what users type (``algorithm=NAME``, ``--algorithm NAME``).
        summary: one line for the CLI help and the docs table.
        description: what it did to the model, for the model card.
        run: ``AlgorithmContext -> dict`` (a history: per-block losses, loss curve, ...), or its
            ``"module:attribute"`` path. It changes the calibrated model in place.
        settings: the frozen dataclass of its settings (or its path); ``None`` if it has none. Presets
            and callers give values for its fields.
        resumable: it saves progress in the cache (``ctx.state``), so an interrupted run continues.
        version: bump whenever its output bytes change; part of the resume-cache key.
        cost: ``(settings, images, settings_of) -> passes``: what it costs, in float forward+backward passes of
            one image (or its path); sizes budgets to the device (:mod:`hub_dfq.budget`). ``None``: negligible.
    """

    name: str
    summary: str
    description: str
    run: Callable[..., Any] | str
    settings: type | str | None = None
    resumable: bool = False
    version: int = 1
    cost: Callable[..., float] | str | None = None


@dataclass(frozen=True)
class Observer:
    """A range finder.

    Args:
        name: what users type (``weight_observer=`` / ``act_observer=``).
        kind: ``"weight"`` (``fn(weight_2d, bits) -> per-row scales`` of a symmetric grid) or ``"activation"``
            (``fn(collected, bits, signed=, percentile=) -> (low, high)``).
        summary: one line for the CLI help and the docs table.
        fn: the function, or its ``"module:attribute"`` path.
        collector: (activations) what gathers the values ``fn`` reads: ``(seed=) -> object`` with
            ``update(tensor)`` (every observed batch) and an ``empty`` property, made once per quantizer, or its
            ``"module:attribute"`` path. The default, :class:`~hub_dfq.quant.observers.ActObserver`, keeps the
            running min/max and a seeded sample of values; an observer that needs other statistics (a
            histogram) brings its own.
        grid_fn: (weights) the observer on an asymmetric grid, the default below 8 bits: ``(weight_2d, bits) ->
            (scale, low)`` per row, ``low`` the row's lowest integer (``-(2^bits - 1) <= low <= 0``), or its
            ``"module:attribute"`` path. Without one, the clipping of each row's ``[min, max]`` with the least
            squared error (:func:`~hub_dfq.quant.observers.mse_weight_grid`).
    """

    name: str
    kind: str
    summary: str
    fn: Callable[..., Any] | str
    collector: Callable[..., Any] | str | None = None
    grid_fn: Callable[..., Any] | str | None = None


@dataclass(frozen=True)
class Preset:
    """A speed/accuracy budget.

    Args:
        name: what users type (``preset=NAME``).
        summary: one line for the CLI help and the docs table.
        calibration_images: calibration images when the caller does not say.
        synth: options of on-the-fly synthesis (:func:`hub_dfq.synth.api.synthesize_folder`).
        algorithms: ``{algorithm name: {setting: value}}``; algorithms not named use their defaults.
        seconds: the time a run should fit on the device it runs on (:mod:`hub_dfq.budget`): the counts above
            are ceilings, shrunk together where the measured device would need longer.
        by_algorithm: ``{algorithm name: {"calibration_images": n, "synth": {...}}}``: the calibration set an
            algorithm is given instead of the one above (an algorithm that gains more from better-matched synthetic
            images than from more of them spends the same time on fewer images and more steps).
    """

    name: str
    summary: str
    calibration_images: int
    synth: Mapping[str, Any] = field(default_factory=dict)
    algorithms: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    seconds: float = 600.0
    by_algorithm: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, change in self.by_algorithm.items():
            unknown = set(change) - {"calibration_images", "synth"}
            if unknown:
                raise ValueError(f"preset {self.name!r}: by_algorithm[{name!r}] may set calibration_images and synth, "
                                 f"not {', '.join(sorted(unknown))}")

    def for_algorithm(self, name: str) -> "Preset":
        """This budget as algorithm ``name`` runs it (:attr:`by_algorithm`; unchanged for other algorithms)."""
        change = self.by_algorithm.get(name)
        if not change:
            return self
        return replace(self, calibration_images=change.get("calibration_images", self.calibration_images),
                       synth={**self.synth, **change.get("synth", {})}, by_algorithm={})

    def scaled(self, scale: float) -> "Preset":
        """This budget with every count multiplied by ``scale`` (:data:`hub_dfq.budget.LADDER`): images stay a
        multiple of 32 and at least 64, steps at least 50; nothing grows past what is written."""
        if scale >= 1.0:
            return self
        synth = dict(self.synth)
        if "iters" in synth:
            synth["iters"] = scaled_count(synth["iters"], scale, floor=50)
        algorithms = {name: {**values, **({"iters": scaled_count(values["iters"], scale, floor=50)}
                                          if "iters" in values else {})}
                      for name, values in self.algorithms.items()}
        return replace(self, calibration_images=scaled_count(self.calibration_images, scale, floor=64, multiple=32),
                       synth=synth, algorithms=algorithms)


QUANT_ALGORITHMS: Registry[QuantAlgorithm] = Registry("quantization algorithm", "algorithm")
WEIGHT_OBSERVERS: Registry[Observer] = Registry("weight observer", "weight_observer")
ACT_OBSERVERS: Registry[Observer] = Registry("activation observer", "act_observer")
PRESETS: Registry[Preset] = Registry("preset", "preset")


def register_algorithm(algorithm: QuantAlgorithm, *, overwrite: bool = False) -> QuantAlgorithm:
    """Add a quantization algorithm (see :class:`QuantAlgorithm`)."""
    return QUANT_ALGORITHMS.register(algorithm, overwrite=overwrite)


def register_observer(observer: Observer, *, overwrite: bool = False) -> Observer:
    """Add a weight or activation observer (see :class:`Observer`)."""
    registry = {"weight": WEIGHT_OBSERVERS, "activation": ACT_OBSERVERS}.get(observer.kind)
    if registry is None:
        raise ValueError(f"observer kind must be 'weight' or 'activation', got {observer.kind!r}")
    return registry.register(observer, overwrite=overwrite)


def register_preset(preset: Preset, *, overwrite: bool = False) -> Preset:
    """Add a preset (see :class:`Preset`)."""
    return PRESETS.register(preset, overwrite=overwrite)


register_algorithm(QuantAlgorithm(
    "calibrate", summary="ranges from the calibration data, nearest rounding (seconds)",
    description="ranges set on the calibration data, nearest rounding",
    run="hub_dfq.quant.calibrate:run_calibrate"))
register_algorithm(QuantAlgorithm(
    "gptq", summary="second-order rounding (GPTQ): each layer's rounding error compensated on its other weights",
    description="second-order weight rounding (GPTQ / Optimal Brain Quantization) against each layer's input "
                "Hessian on the calibration images",
    run="hub_dfq.quant.gptq:run_gptq", settings="hub_dfq.quant.gptq:GPTQConfig", cost="hub_dfq.quant.gptq:cost"))
register_algorithm(QuantAlgorithm(
    "reconstruct", summary="block-wise reconstruction: learned rounding (AdaRound) and step sizes (LSQ), QDrop",
    description="block-wise output reconstruction (learned AdaRound weight rounding and LSQ activation steps) "
                "against the full-precision blocks",
    run="hub_dfq.quant.reconstruct:run_reconstruct", settings="hub_dfq.quant.reconstruct:ReconstructConfig",
    cost="hub_dfq.quant.reconstruct:cost",
    resumable=True, version=4))  # 2: learned steps kept inside a ReLU6's range; 3: GPTQ start, QDrop mask bytes;
# 4: the GPTQ start damped 0.3
register_algorithm(QuantAlgorithm(
    "distill", summary="knowledge distillation from the full-precision model on the calibration images",
    description="knowledge distillation from the full-precision model (straight-through estimator, learned step "
                "sizes)",
    run="hub_dfq.quant.distill:run_distill", settings="hub_dfq.quant.distill:DistillConfig", resumable=True,
    cost="hub_dfq.quant.distill:cost",
    version=2))

register_observer(Observer("minmax", "weight", "max |w| per output channel ([min, max] on an asymmetric grid)",
                           fn="hub_dfq.quant.observers:minmax_weight_scale",
                           grid_fn="hub_dfq.quant.observers:minmax_weight_grid"))
register_observer(Observer("mse", "weight", "clipping that minimises the squared rounding error per channel",
                           fn="hub_dfq.quant.observers:mse_weight_scale",
                           grid_fn="hub_dfq.quant.observers:mse_weight_grid"))
register_observer(Observer("minmax", "activation", "the observed minimum and maximum",
                           fn="hub_dfq.quant.observers:minmax_range"))
register_observer(Observer("percentile", "activation", "the percentile-clipped range (99.99% by default)",
                           fn="hub_dfq.quant.observers:percentile_range"))
register_observer(Observer("mse", "activation", "the clipping that minimises the squared quantization error",
                           fn="hub_dfq.quant.observers:mse_range"))

# ResNet-20 W4A4 in about 5 minutes on 2 CPU cores, synthesis included.
register_preset(Preset(
    "fast", summary="up to 256 synthetic images and 300 reconstruction steps per block, fitted to 10 min on the device",
    calibration_images=256, synth={"iters": 200, "batch_size": 128}, seconds=600,
    algorithms={"reconstruct": {"iters": 300, "batch_size": 32}, "distill": {"iters": 300, "batch_size": 64}}))
# 4x the images (the lever that pays: ResNet-20 W4A4 -0.61 -> -0.33), 3x the fitting steps;
# distillation starts from a reconstructed model. Synthesis keeps the fast preset's 200 steps:
# images matched for 500 steps reached a 5x lower BN divergence yet calibrated worse (-0.59).
register_preset(Preset(
    "best", summary="up to 1,024 synthetic images (GPTQ: 256 with 4x the steps) and 1,000 reconstruction steps per "
                    "block, fitted to 50 min",
    calibration_images=1024, synth={"iters": 200, "batch_size": 128}, seconds=3000,
    algorithms={"reconstruct": {"iters": 1000, "batch_size": 32},
                "distill": {"iters": 1000, "batch_size": 64, "init": "reconstruct"}},
    # GPTQ needs no fitting steps: the time goes into synthesis, and there steps pay where images did not
    # (Lite0 W4A8: 704 images x 141 steps no better than 128 x 118; 96 x 250 closer to float than 96 x 84)
    by_algorithm={"gptq": {"calibration_images": 256, "synth": {"iters": 800}}}))
