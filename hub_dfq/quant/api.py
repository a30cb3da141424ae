"""``quantize``: one verb from a float :class:`VisionModel` to a :class:`QuantizedModel`.

A recipe over the public stages (:mod:`hub_dfq.quant.stages`: prepare -> calibrate -> apply -> freeze) that adds
what a one-liner needs: the model from a spec, the preset sized to the device and to a checkpoint size, the
calibration data (synthesised on the fly), its provenance, and rank 0's model for every process.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import replace
from typing import Any, Iterable, Mapping

import torch

from ..budget import REFERENCE_GFLOPS, BudgetPlan, device_speed, parse_duration, plan_budget
from ..deprecation import MovedInto, renamed_arguments
from ..models.loader import load_model
from ..models.vision_model import VisionModel
from ..registry import resolve
from ..runner import Runner
from ..runtime import place_model
from ..synth.config import SynthConfig
from ..synth.registry import SYNTH_METHODS
from ..synth.speed import synthesis_step_seconds
from .algorithms import algorithm_settings, settings_resolver
from .allocate import BIT_CHOICES, allocate_bits, check_budget, parse_size
from .config import QuantConfig, QuantScheme
from .data import calibration_tensor, is_synthetic
from .model import QuantizedModel
from .placement import PlacementRules
from .registry import DEFAULT_CALIBRATION, PRESETS, QUANT_ALGORITHMS, Preset
from .resume import load_quantizer_state, quantizer_state
from .stages import AUTO, apply, calibrate, default_algorithm, freeze, prepare, quantization_fingerprint

logger = logging.getLogger(__name__)

__all__ = ["quantize", "quantization_fingerprint", "AUTO", "default_algorithm"]

SENSITIVITY_IMAGES = 32  # calibration images a layer's sensitivity is measured on (size budgets)
# what measuring one layer's sensitivity costs, in float forward+backward passes: each bit width reruns the model
# from the layer's block on, half the model on average, forward only (a third of a pass). Lite0 (50 layers,
# 2 threads): 74 s expected, 56 s measured.
SENSITIVITY_PASSES_PER_LAYER = SENSITIVITY_IMAGES * len(BIT_CHOICES) / 2 / 3
# what observing one calibration image costs, in float forward+backward passes of it (MSE range searches)
CALIBRATE_PASSES = 2.0
# the share of a preset's target time a range-only run plans for: ranges need few images (Lite0 W8A8 from 64 BNS
# images x 64 steps is within float's noise, docs/imagenet.md) and an 8-bit run is promised in minutes
CALIBRATE_SHARE = 0.25


def _resolve_config(config: QuantConfig | None, *, weights: int, activations: int, first_last_bits: int | None,
                    residual_bits: int | None, weight_observer: str, act_observer: str, weight_grid: str,
                    overrides: Mapping[str, Any] | None, include: Iterable[str] | None,
                    exclude: Iterable[str] | None) -> QuantConfig:
    if config is not None:
        return config
    scheme = QuantScheme(weights=weights, activations=activations, weight_observer=weight_observer,
                         act_observer=act_observer, weight_grid=weight_grid)
    return QuantConfig(default=scheme, first_last_bits=first_last_bits, residual_bits=residual_bits,
                       overrides=dict(overrides or {}), include=tuple(include or ("*",)), exclude=tuple(exclude or ()))


def _size_plan(prepared, cfg: QuantConfig, model: VisionModel, size_budget: Any) -> tuple[int, dict[str, int]]:
    """``(budget in bytes, pinned layers' bits)``, checked against what 2-8 bits can reach (before any work)."""
    float_bytes = sum(t.numel() * t.element_size() for t in model.module.state_dict().values())
    budget = parse_size(size_budget, float_bytes=float_bytes)
    pinned = {}
    for name, info in prepared.report.quantized.items():
        explicit = any(fnmatch.fnmatchcase(name, pattern) and "weights" in dict(change)
                       for pattern, change in cfg.overrides)
        if explicit or ((info["first"] or info["last"]) and cfg.first_last_bits is not None):
            pinned[name] = info["weights"]
    check_budget(prepared.module, budget, pinned=pinned, float_bytes=float_bytes)
    return budget, pinned


def _time_plan(model: VisionModel, preset, algorithm: str, calibration: Any, calibration_images: int | None,
               settings: Mapping[str, Any], synth_options: Mapping[str, Any] | None, time_budget: Any,
               seed: int, runner: Runner, fixed_passes: float = 0.0) -> BudgetPlan:
    """The ladder scale of ``preset`` whose expected time on the model's device fits the time budget (with
    ``fixed_passes`` of work that no scale changes, a size budget's sensitivity measurement)."""
    target = parse_duration(time_budget) if time_budget is not None else \
        preset.seconds * (CALIBRATE_SHARE if algorithm == "calibrate" else 1.0)
    # every process plans from rank 0's measurement: the same counts everywhere
    speed = runner.main_only(device_speed, model)
    algorithm_info = QUANT_ALGORITHMS.get(algorithm)
    fixed_images = len(calibration) if isinstance(calibration, torch.Tensor) else None
    synthetic = is_synthetic(calibration) and SYNTH_METHODS.get(calibration.lower()).optimised
    if synthetic:  # a synthesis step's cost in passes differs from machine to machine: it is timed, not assumed
        probe = SynthConfig(method=calibration.lower(), **{k: v for k, v in dict(synth_options or {}).items()
                                                           if k in ("loss", "precision")})
        speed = replace(speed, synthesis_step=runner.main_only(synthesis_step_seconds, model, probe))

    def cost(scale: float) -> tuple[float, dict[str, int]]:
        sized = preset.scaled(scale)
        images = calibration_images or fixed_images or sized.calibration_images
        counts = {"images": images}
        passes = fixed_passes + CALIBRATE_PASSES * images
        if synthetic:
            counts["synthesis steps"] = int({**sized.synth, **dict(synth_options or {})}.get("iters", 0))
            passes += speed.synthesis_step / speed.seconds_per_image * counts["synthesis steps"] * images
        of = lambda name: algorithm_settings(QUANT_ALGORITHMS.get(name), sized, settings.get(name), seed=seed)  # noqa: E731
        if algorithm_info.cost is not None:
            run = of(algorithm)
            if getattr(run, "iters", None):
                counts[f"{algorithm} steps"] = run.iters
            passes += resolve(algorithm_info.cost)(run, images, of)
        return passes, counts

    return plan_budget(cost, speed=speed, target_seconds=target, strict=time_budget is not None)


def _calibration_data(model: VisionModel, calibration: Any, *, images: int | None, preset: Preset, preset_name: str,
                      synth: dict[str, Any], seed: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """The calibration tensor, on the model's device, and its provenance for the card."""
    # a tensor is data the caller prepared: all of it calibrates unless they say otherwise
    default_size = None if isinstance(calibration, torch.Tensor) else preset.calibration_images
    data, provenance = calibration_tensor(model, calibration, size=images or default_size, seed=seed,
                                          synth_options=synth)
    provenance = {**provenance, "preset": preset_name}
    if is_synthetic(calibration):
        provenance["synth_options"] = {k: v for k, v in synth.items() if k != "progress"}
    return data.to(model.device), provenance


def _share_main_model(qmodel: QuantizedModel, runner: Runner) -> None:
    """Every process goes on with rank 0's model (GPU kernels need not be deterministic)."""
    if runner.enabled:
        load_quantizer_state(qmodel.module, runner.main_only(quantizer_state, qmodel.module))


@renamed_arguments(method="algorithm", calibration_size="calibration_images", config="quant_config",
                   reconstruct_config=MovedInto("settings", "reconstruct"),
                   distill_config=MovedInto("settings", "distill"))
def quantize(
    model: VisionModel | str,
    *,
    weights: int = 4,
    activations: int = 4,
    calibration: Any = DEFAULT_CALIBRATION,
    calibration_images: int | None = None,
    algorithm: str = AUTO,
    preset: str = "fast",
    quant_config: QuantConfig | None = None,
    placement: PlacementRules | None = None,
    first_last_bits: int | None = 8,
    residual_bits: int | None = 8,
    weight_observer: str = "mse",
    act_observer: str = "mse",
    weight_grid: str = "asymmetric",
    overrides: Mapping[str, Any] | None = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    settings: Mapping[str, Any] | None = None,
    synth_options: Mapping[str, Any] | None = None,
    size_budget: int | float | str | None = None,
    time_budget: float | str | None = None,
    seed: int = 0,
    resume: bool = True,
    progress: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    device: str | torch.device | None = None,
    runner: Runner | None = None,
) -> QuantizedModel:
    """Quantize a classifier to ``weights``/``activations`` bits, calibrated without its training data.

    BN layers are folded into the convolutions; weights are quantized per output channel
    (asymmetric below 8 bits unless ``weight_grid="symmetric"``), activations per tensor at the input of every
    conv/linear and at the residual additions. The first conv and last linear stay at 8 bits unless
    ``first_last_bits=None``.

    Under ``accelerate launch`` on-the-fly synthetic calibration data is shared out over the
    processes, ``distill`` trains data-parallel, and every process returns rank 0's model.

    A recipe over the stages :func:`hub_dfq.prepare`, :func:`hub_dfq.calibrate`, :func:`hub_dfq.apply` and
    :func:`hub_dfq.freeze` (:mod:`hub_dfq.quant.stages`): call them yourself to step in between.

    Args:
        model: a :class:`VisionModel` or a spec for :func:`hub_dfq.load_model`.
        weights: weight bit width (2-8).
        activations: activation bit width (2-8).
        calibration: a registered synthesis method (``"bns+p"``, the default: BNS with image priors; ``"bns"``,
            ``"bns+i"``, ``"inception"``, ``"gaussian"``, generated on the fly and cached), a dataset spec, an
            :class:`~hub_dfq.ImageData`, a ``datasets.Dataset`` or a tensor of normalised inputs.
        calibration_images: images to calibrate with (default: the preset's; all rows of a tensor).
        algorithm: a registered quantization algorithm: ``"calibrate"`` (ranges only), ``"gptq"``
            (second-order rounding), ``"reconstruct"`` (GPTQ, then block-wise AdaRound + LSQ) or ``"distill"``
            (knowledge distillation from the full-precision model); see :mod:`hub_dfq.quant.registry`.
            ``"auto"`` (default): ``calibrate`` at 8 bits, ``gptq`` for weights below, ``reconstruct`` for inputs
            below 8 bits (:func:`default_algorithm`).
        preset: a registered preset, ``"fast"`` or ``"best"``.
        quant_config: a full :class:`QuantConfig` (then the bit and observer arguments are ignored).
        placement: the inference backend's placement rules (``hub_dfq.BACKENDS.get("openvino").placement``), over
            the config's; default ONNX Runtime's.
        first_last_bits: bits of the first and last layers; ``None`` quantizes them like the rest.
        residual_bits: bits of residual-addition operands; ``None`` uses ``activations``.
        weight_observer: a registered weight observer, ``"mse"`` or ``"minmax"``.
        act_observer: a registered activation observer, ``"mse"``, ``"percentile"`` or ``"minmax"``.
        weight_grid: ``"asymmetric"`` (default): below 8 bits each output channel's integers span ``[low, low + 2^b -
            1]`` over its own range (16 levels at 4 bits instead of the symmetric grid's 15 around zero; EfficientNet-
            Lite0's depthwise kernels round with 0.35-0.58x the error); ``"symmetric"``: ``[-(2^(b-1)-1),
            2^(b-1)-1]``. Zero is exact on both, and the integers run in int8 kernels as they are.
        overrides: ``{glob: {field: value}}`` per-module scheme changes (mixed precision).
        include: globs of module names to quantize.
        exclude: globs of module names to keep in float.
        settings: ``{algorithm name: settings dataclass or {field: value}}``, over the preset's.
        synth_options: overrides the preset's synthesis options.
        size_budget: the most bytes the checkpoint's tensors may take (``3_000_000``, ``"2.9MB"``) or a ratio of
            the float32 checkpoint (``"0.16x"``, ``"16%"``): every layer not pinned (first/last layer, layers
            with a ``weights`` override) gets 2, 4 or 8-bit weights, chosen on the calibration images by measured
            sensitivity (:mod:`hub_dfq.quant.allocate`); ``weights`` is then only the card's nominal width.
        time_budget: seconds (or ``"15m"``, ``"1h"``) the run should take on its device. The preset's counts are
            ceilings, shrunk together until the run's expected time (from the device's measured speed,
            :mod:`hub_dfq.budget`) fits; counts given explicitly are kept. Default: the preset's target for models
            larger than the CIFAR ResNets it was written for (those keep its counts on any device).
        seed: seed of synthesis, observers and the algorithm (same seed, same bytes).
        resume: save the progress of resumable algorithms (``reconstruct``, ``distill``) in the cache
            and continue an interrupted run of the same inputs where it stopped (same result as one run).
        progress: show progress bars (``None``: on a terminal).
        token: Hub token, when ``model`` or ``calibration`` is a Hub id.
        revision: Hub revision of the model, when ``model`` is a spec.
        device: where to run (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``); the model is moved there.
            ``None``: where the model is. Reconstruction and distillation compute in float32 everywhere.
        runner: the processes that share the run (default: :class:`~hub_dfq.runner.Runner` over the process group
            of the environment): rank 0 measures the device for the time plan, distillation splits each batch,
            and every process returns rank 0's model.

    Returns:
        A :class:`QuantizedModel`.

    Raises:
        ConfigError: bits outside 2-8, unknown algorithm, preset or observer; an explicit ``time_budget`` that
            even the smallest counts cannot meet.
        DatasetError: an empty or unreadable calibration set.
        UnsupportedModelError: a model without conv/linear layers, one that cannot be traced, or one
            that is already quantized.

    Example:
        >>> qmodel = hub_dfq.quantize("default", weights=4, activations=4, algorithm="reconstruct")
        >>> qmodel.evaluate("default")["top1"]
    """
    settings = dict(settings or {})
    chosen = PRESETS.get(preset)
    runner = Runner() if runner is None else runner
    cfg = _resolve_config(quant_config, weights=weights, activations=activations, first_last_bits=first_last_bits,
                          residual_bits=residual_bits, weight_observer=weight_observer, act_observer=act_observer,
                          weight_grid=weight_grid, overrides=overrides, include=include, exclude=exclude)
    if placement is not None:
        cfg = replace(cfg, placement=placement)
    auto = algorithm == AUTO
    # unknown algorithms and settings fail before minutes of synthesis ("auto": its costliest candidate)
    settings_resolver(chosen, settings, seed=seed)("reconstruct" if auto else algorithm)
    if not isinstance(model, VisionModel):
        model = load_model(model, revision=revision, token=token)
    place_model(model, device)
    start = time.perf_counter()
    prepared = prepare(model, cfg)
    if auto:
        algorithm = default_algorithm(prepared.report)
    chosen = chosen.for_algorithm(algorithm)
    budget_plan = None
    if time_budget is not None or model.gflops() > REFERENCE_GFLOPS:
        sensitivity = SENSITIVITY_PASSES_PER_LAYER * len(prepared.report.quantized) if size_budget is not None else 0
        budget_plan = _time_plan(model, chosen, algorithm, calibration, calibration_images, settings,
                                 synth_options, time_budget, seed, runner=runner, fixed_passes=sensitivity)
        chosen = chosen.scaled(budget_plan.scale)
    settings_resolver(chosen, settings, seed=seed)(algorithm)  # what this run uses, also checked before synthesis
    if size_budget is not None:
        budget, pinned = _size_plan(prepared, cfg, model, size_budget)
    synth = {**chosen.synth, **dict(synth_options or {}), "progress": progress}
    data, source = _calibration_data(model, calibration, images=calibration_images, preset=chosen,
                                     preset_name=preset, synth=synth, seed=seed)
    timings = {"data": time.perf_counter() - start}
    allocation = None
    if size_budget is not None:
        allocation = allocate_bits(prepared.module, prepared.node_blocks, data[:SENSITIVITY_IMAGES], budget=budget,
                                   pinned=pinned, progress=progress)
        prepared = prepare(model, replace(cfg, overrides=(*cfg.overrides, *allocation.overrides().items())))
        timings["allocate"] = time.perf_counter() - start - timings["data"]
        if auto:  # the allocation may leave every layer at 8 bits
            algorithm = default_algorithm(prepared.report)
    calibrate(prepared, data, seed=seed, progress=progress, source=source)
    timings["calibrate"] = time.perf_counter() - start - timings["data"] - timings.get("allocate", 0.0)
    apply(prepared, algorithm, data, settings=settings, preset=chosen, seed=seed, progress=progress, resume=resume,
          runner=runner)
    prepared.history["seconds"] = timings  # before the fingerprint freeze() adds, as always
    qmodel = freeze(prepared)
    _share_main_model(qmodel, runner)
    timings["total"] = time.perf_counter() - start
    if allocation is not None:
        qmodel.history["allocation"] = allocation.to_dict()
    if budget_plan is not None:
        qmodel.history["budget"] = budget_plan.to_dict()
    logger.info("quantized %s to W%dA%d with %s in %.1f s", model.source.spec, qmodel.config.default.weights,
                qmodel.config.default.activations, algorithm, timings["total"])
    return qmodel
