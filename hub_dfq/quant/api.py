"""``quantize``: one verb from a float :class:`VisionModel` to a :class:`QuantizedModel`."""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import time
from dataclasses import replace
from typing import Any, Iterable, Mapping

import torch

from ..budget import REFERENCE_GFLOPS, BudgetPlan, device_speed, parse_duration, plan_budget
from ..deprecation import warn_deprecated
from ..distributed import current
from ..errors import UnsupportedModelError
from ..fingerprint import fingerprint, weights_sha256
from ..models.loader import load_model
from ..models.vision_model import VisionModel
from ..registry import resolve
from ..runtime import place_model
from ..synth.registry import SYNTH_METHODS
from .algorithms import (
    AlgorithmContext,
    algorithm_settings,
    run_algorithm,
    settings_dict,
)
from .allocate import allocate_bits, check_budget, parse_size
from .calibrate import calibrate_activations, calibrate_weights, freeze_weights
from .config import QuantConfig, QuantScheme
from .data import calibration_tensor, is_synthetic
from .model import QuantizedModel
from .placement import PlacementRules
from .prepare import prepare
from .registry import PRESETS, QUANT_ALGORITHMS
from .resume import RunState, load_quantizer_state, quantizer_state

logger = logging.getLogger(__name__)

__all__ = ["quantize", "quantization_fingerprint", "AUTO", "default_algorithm"]

AUTO = "auto"  # the algorithm that fits the bit widths asked for (see default_algorithm)
SENSITIVITY_IMAGES = 32  # calibration images a layer's sensitivity is measured on (size budgets)
# what observing one calibration image costs, in float forward+backward passes of it (MSE range searches)
CALIBRATE_PASSES = 2.0
# what one synthesis step of one image costs, in float forward+backward passes as the speed probe measures them:
# the synthesis loop is bf16 where the device has it and fused (measured on Lite0, CPU, 2 threads: 31 ms per
# image-step against a 129 ms fp32 pass)
SYNTH_STEP_PASSES = 0.25
# the share of a preset's target time a range-only run plans for: ranges need few images (Lite0 W8A8 from 64 BNS
# images x 64 steps is within float's noise, docs/imagenet.md) and an 8-bit run is promised in minutes
CALIBRATE_SHARE = 0.25

# Of the calibration pipeline around the algorithms (prepare, observers, freezing); bump whenever it
# changes the bytes of a quantized model. Part of the fingerprint and of the resume-cache key.
PIPELINE_VERSION = 1


def _resolve_config(config: QuantConfig | None, *, weights: int, activations: int, first_last_bits: int | None,
                    residual_bits: int | None, weight_observer: str, act_observer: str,
                    overrides: Mapping[str, Any] | None, include: Iterable[str] | None,
                    exclude: Iterable[str] | None) -> QuantConfig:
    if config is not None:
        return config
    scheme = QuantScheme(weights=weights, activations=activations, weight_observer=weight_observer,
                         act_observer=act_observer)
    return QuantConfig(default=scheme, first_last_bits=first_last_bits, residual_bits=residual_bits,
                       overrides=dict(overrides or {}), include=tuple(include or ("*",)), exclude=tuple(exclude or ()))


def default_algorithm(report) -> str:
    """What ``"auto"`` runs on a prepared model (its :class:`~hub_dfq.quant.prepare.PrepareReport`): ``"calibrate"``
    when every quantized layer keeps 8-bit weights and inputs (ranges are enough there); ``"gptq"`` when only
    weights go below 8 bits (second-order rounding; on Lite0 W4A8 block reconstruction from the GPTQ start
    ended worse than the start in every block at CPU budgets, so it would only cost time); ``"reconstruct"``
    when inputs go below 8 bits, where the activation error needs the block fit."""
    weights = min((layer["weights"] for layer in report.quantized.values()), default=8)
    inputs = min((layer["activations"] for layer in report.quantized.values()), default=8)
    if inputs < 8:
        return "reconstruct"
    return "calibrate" if weights >= 8 else "gptq"


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
               seed: int) -> BudgetPlan:
    """The ladder scale of ``preset`` whose expected time on the model's device fits the time budget."""
    target = parse_duration(time_budget) if time_budget is not None else \
        preset.seconds * (CALIBRATE_SHARE if algorithm == "calibrate" else 1.0)
    dist = current()
    # every process plans from rank 0's measurement: the same counts everywhere
    speed = device_speed(model) if dist.is_main else None
    speed = dist.broadcast(speed) if dist.enabled else speed
    spec = QUANT_ALGORITHMS.get(algorithm)
    fixed_images = len(calibration) if isinstance(calibration, torch.Tensor) else None
    synthetic = is_synthetic(calibration) and SYNTH_METHODS.get(calibration.lower()).loss is not None

    def cost(scale: float) -> tuple[float, dict[str, int]]:
        sized = preset.scaled(scale)
        images = calibration_images or fixed_images or sized.calibration_images
        counts = {"images": images}
        passes = CALIBRATE_PASSES * images
        if synthetic:
            counts["synthesis steps"] = int({**sized.synth, **dict(synth_options or {})}.get("iters", 0))
            passes += SYNTH_STEP_PASSES * counts["synthesis steps"] * images
        of = lambda name: algorithm_settings(QUANT_ALGORITHMS.get(name), sized, settings.get(name), seed=seed)  # noqa: E731
        if spec.cost is not None:
            run = of(algorithm)
            if getattr(run, "iters", None):
                counts[f"{algorithm} steps"] = run.iters
            passes += resolve(spec.cost)(run, images, of)
        return passes, counts

    return plan_budget(cost, speed=speed, target_seconds=target, strict=time_budget is not None)


def quantization_fingerprint(*, weights: str, config: QuantConfig, algorithm: str, settings: dict[str, Any],
                             data: torch.Tensor, seed: int, device_type: str) -> str:
    """The fingerprint of a quantization run: what made the model (recorded in its card, keys its resume state)."""
    spec = QUANT_ALGORITHMS.get(algorithm)
    return fingerprint("quantize", version=PIPELINE_VERSION, weights=weights, config=config.to_dict(),
                       algorithm=algorithm, algorithm_version=spec.version, settings=settings, data=data, seed=seed,
                       device_type=device_type)


def _deprecated(old: str, new: str) -> None:
    warn_deprecated(old, new, stacklevel=3)


def quantize(
    model: VisionModel | str,
    *,
    weights: int = 4,
    activations: int = 4,
    calibration: Any = "bns",
    calibration_images: int | None = None,
    algorithm: str = AUTO,
    preset: str = "fast",
    quant_config: QuantConfig | None = None,
    placement: PlacementRules | None = None,
    first_last_bits: int | None = 8,
    residual_bits: int | None = 8,
    weight_observer: str = "mse",
    act_observer: str = "mse",
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
    **deprecated: Any,
) -> QuantizedModel:
    """Quantize a classifier to ``weights``/``activations`` bits, calibrated without its training data.

    BN layers are folded into the convolutions; weights are quantized per output channel
    (symmetric), activations per tensor at the input of every conv/linear and at the residual
    additions. The first conv and last linear stay at 8 bits unless ``first_last_bits=None``.

    Under ``accelerate launch`` on-the-fly synthetic calibration data is shared out over the
    processes, ``distill`` trains data-parallel, and every process returns rank 0's model.

    Args:
        model: a :class:`VisionModel` or a spec for :func:`hub_dfq.load_model`.
        weights: weight bit width (2-8).
        activations: activation bit width (2-8).
        calibration: a registered synthesis method (``"bns"``, ``"bns+i"``, ``"inception"``,
            ``"gaussian"``, generated on the fly and cached), a dataset spec, an
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
    renamed = {"algorithm": algorithm, "calibration_images": calibration_images, "quant_config": quant_config}
    for old, new in (("method", "algorithm"), ("calibration_size", "calibration_images"), ("config", "quant_config")):
        if old in deprecated:
            _deprecated(old, new)
            renamed[new] = deprecated.pop(old)
    algorithm, calibration_images, quant_config = (renamed["algorithm"], renamed["calibration_images"],
                                                   renamed["quant_config"])
    for name in ("reconstruct", "distill"):
        if f"{name}_config" in deprecated:
            _deprecated(f"{name}_config", f"settings={{'{name}': ...}}")
            settings[name] = deprecated.pop(f"{name}_config")
    if deprecated:
        raise TypeError(f"quantize() got unexpected keyword argument(s) {sorted(deprecated)}")
    chosen = PRESETS.get(preset)
    cfg = _resolve_config(quant_config, weights=weights, activations=activations, first_last_bits=first_last_bits,
                          residual_bits=residual_bits, weight_observer=weight_observer, act_observer=act_observer,
                          overrides=overrides, include=include, exclude=exclude)
    if placement is not None:
        cfg = replace(cfg, placement=placement)
    auto = algorithm == AUTO
    if auto:  # resolved on the prepared model below; both candidates' settings are checked now
        algorithm = "reconstruct"
        QUANT_ALGORITHMS.get("calibrate")
    spec = QUANT_ALGORITHMS.get(algorithm)
    for name in settings:
        QUANT_ALGORITHMS.get(name)
    settings_of = {}

    def settings_for(name: str) -> Any:
        if name not in settings_of:
            settings_of[name] = algorithm_settings(QUANT_ALGORITHMS.get(name), chosen, settings.get(name), seed=seed)
        return settings_of[name]

    run_settings = settings_for(algorithm)  # checked before minutes of synthesis
    if not isinstance(model, VisionModel):
        model = load_model(model, revision=revision, token=token)
    place_model(model, device)
    if model.quantization_config is not None:
        raise UnsupportedModelError(f"{model.source.spec} is already quantized: quantize its base model "
                                    f"({model.quantization_config.get('base_model', 'see its card')}) instead")
    start = time.perf_counter()
    prepared = prepare(model.module, cfg, example_input=model.example_input(1))
    if auto:
        algorithm = default_algorithm(prepared.report)
        spec = QUANT_ALGORITHMS.get(algorithm)
    budget_plan = None
    if time_budget is not None or model.gflops() > REFERENCE_GFLOPS:
        budget_plan = _time_plan(model, chosen, algorithm, calibration, calibration_images, settings,
                                 synth_options, time_budget, seed)
        chosen = chosen.scaled(budget_plan.scale)
    settings_of.clear()
    run_settings = settings_for(algorithm)
    timings: dict[str, float] = {}
    if size_budget is not None:
        budget, pinned = _size_plan(prepared, cfg, model, size_budget)
    synth = {**chosen.synth, **dict(synth_options or {}), "progress": progress}
    # a tensor is data the caller prepared: all of it calibrates unless they say otherwise
    default_size = None if isinstance(calibration, torch.Tensor) else chosen.calibration_images
    data, provenance = calibration_tensor(model, calibration, size=calibration_images or default_size,
                                          seed=seed, synth_options=synth)
    data = data.to(model.device)
    timings["data"] = time.perf_counter() - start
    allocation = None
    if size_budget is not None:
        allocation = allocate_bits(prepared.module, prepared.node_blocks, data[:SENSITIVITY_IMAGES], budget=budget,
                                   pinned=pinned, progress=progress)
        cfg = replace(cfg, overrides=(*cfg.overrides, *allocation.overrides().items()))
        prepared = prepare(model.module, cfg, example_input=model.example_input(1))
        timings["allocate"] = time.perf_counter() - start - timings["data"]
    if auto and default_algorithm(prepared.report) != algorithm:  # the allocation may leave every layer at 8 bits
        algorithm = default_algorithm(prepared.report)
        spec, run_settings = QUANT_ALGORITHMS.get(algorithm), settings_for(algorithm)
    gm = prepared.module
    calibrate_weights(gm)
    calibrate_activations(gm, data, seed=seed, progress=progress)
    timings["calibrate"] = time.perf_counter() - start - timings["data"] - timings.get("allocate", 0.0)
    algorithm_config = settings_dict(run_settings)
    # an algorithm that starts from another one's result (distill <- reconstruct <- gptq) records its settings too
    init = getattr(run_settings, "init", None)
    while init in QUANT_ALGORITHMS and init not in algorithm_config and init != "calibrate":
        algorithm_config[init] = settings_dict(settings_for(init))
        init = getattr(settings_for(init), "init", None)
    run_fingerprint = quantization_fingerprint(
        weights=weights_sha256(model.module), config=cfg, algorithm=algorithm, settings=algorithm_config,
        data=data, seed=seed, device_type=model.device.type)
    state = None
    if resume and spec.resumable:
        state = RunState.for_run(version=PIPELINE_VERSION, run=run_fingerprint)
    context = AlgorithmContext(module=gm, node_blocks=prepared.node_blocks, data=data, settings=run_settings,
                               seed=seed, progress=progress, state=state, settings_of=settings_for)
    with state.locked() if state is not None else contextlib.nullcontext():
        history = run_algorithm(algorithm, context)
        if state is not None:
            state.clear()  # the model is complete: nothing left to resume
    freeze_weights(gm)
    gm.eval()
    dist = current()
    if dist.enabled:  # every process goes on with rank 0's model (GPU kernels need not be deterministic)
        load_quantizer_state(gm, dist.broadcast(quantizer_state(gm) if dist.is_main else None))
    timings["total"] = time.perf_counter() - start
    history["seconds"] = timings
    history["fingerprint"] = run_fingerprint
    if allocation is not None:
        history["allocation"] = allocation.to_dict()
    if budget_plan is not None:
        history["budget"] = budget_plan.to_dict()
    provenance = {**provenance, "preset": preset}
    if is_synthetic(calibration):
        provenance["synth_options"] = {k: v for k, v in synth.items() if k != "progress"}
    logger.info("quantized %s to W%dA%d with %s in %.1f s", model.source.spec, cfg.default.weights,
                cfg.default.activations, algorithm, timings["total"])
    return QuantizedModel(gm, cfg, model, provenance, algorithm, algorithm_config, prepared.report, history)
