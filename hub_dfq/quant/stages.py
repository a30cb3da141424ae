"""The stages under :func:`hub_dfq.quantize`, public so that a caller can step in between them.

    prepared = hub_dfq.prepare(model, QuantConfig(default=QuantScheme(weights=4, activations=8)))
    hub_dfq.calibrate(prepared, batches)            # or: with hub_dfq.calibrating(prepared) as module: ...
    hub_dfq.apply(prepared, "gptq", batches)        # a registered algorithm
    qmodel = hub_dfq.freeze(prepared)               # a QuantizedModel

As in PyTorch's ``prepare_pt2e`` -> calibration -> ``convert_pt2e`` and optimum-quanto's ``quantize`` ->
``Calibration()`` -> ``freeze``, the one-line verb is a recipe over these: :func:`~hub_dfq.quant.api.quantize` adds
model loading, budgets, calibration data and provenance. The same config, data and seed through the stages give
the same bytes as ``quantize``. Process groups stay out of the stages (``quantize`` shares rank 0's model).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import fx
from tqdm.auto import tqdm

from ..errors import ArgumentTypeError, ConfigError, DatasetError, UnsupportedModelError
from ..fingerprint import fingerprint, weights_sha256
from ..models.vision_model import VisionModel
from ..progress import progress_enabled
from ..runner import Runner
from .algorithms import AlgorithmContext, recorded_settings, run_algorithm, settings_resolver
from .calibrate import calibrate_weights, freeze_weights, observe_activations
from .config import QuantConfig
from .model import QuantizedModel
from .prepare import PrepareReport
from .prepare import prepare as prepare_graph
from .registry import PRESETS, QUANT_ALGORITHMS, Preset
from .resume import RunState

__all__ = ["PreparedModel", "prepare", "calibrate", "calibrating", "apply", "freeze", "default_algorithm",
           "quantization_fingerprint", "AUTO", "PIPELINE_VERSION", "CALIBRATION_BATCH"]

AUTO = "auto"  # the algorithm that fits the bit widths asked for (see default_algorithm)
CALIBRATION_BATCH = 64  # images per observing forward pass when the calibration data is one tensor

# Of the calibration pipeline around the algorithms (prepare, observers, freezing); bump whenever it
# changes the bytes of a quantized model. Part of the fingerprint and of the resume-cache key.
PIPELINE_VERSION = 1

# What each stage accepts the model in, and what to do instead.
_ACCEPTS = {"calibrate": ("prepared", "calibrated"), "apply": ("calibrated",), "freeze": ("calibrated", "applied")}


@dataclass(eq=False)
class PreparedModel:
    """A float model made a fake-quant graph, between :func:`prepare` and :func:`freeze`.

    The stages change it in place (and return it). Between them, ``module`` is an ordinary
    ``torch.fx.GraphModule``: run it, read or change its quantizers.

    Attributes:
        model: the full-precision source model (not modified).
        config: the quantization config the graph was built with.
        module: the fake-quant graph (BN folded, conv/linear layers swapped, quantizers placed).
        report: what was quantized, folded and left in float.
        node_blocks: the block each graph node belongs to (block-wise algorithms read it).
        stage: ``"prepared"``, ``"calibrated"``, ``"applied"`` or ``"frozen"``.
        calibration: where the calibration data came from (for the model card).
        algorithm: the algorithm :func:`apply` ran (``None``: none yet).
        algorithm_config: its settings, with those of the algorithms it started from.
        history: what the algorithm recorded (per-block losses, ...).
        fingerprint: of the run :func:`apply` made (keys its resume state; recorded in the card).
    """

    model: VisionModel = field(repr=False)
    config: QuantConfig
    module: fx.GraphModule = field(repr=False)
    report: PrepareReport = field(repr=False)
    node_blocks: dict[str, str] = field(repr=False)
    stage: str = "prepared"
    calibration: dict[str, Any] = field(default_factory=dict)
    algorithm: str | None = None
    algorithm_config: dict[str, Any] = field(default_factory=dict)
    history: dict[str, Any] = field(default_factory=dict, repr=False)
    fingerprint: str | None = None
    # (the calibration tensor, its version, the seed, the state digest after calibrating): lets apply() tell
    # quantize's path (ranges from its own data, nothing changed since) from ranges it cannot describe
    _calibrated_with: tuple | None = field(default=None, init=False, repr=False)


def _check_stage(prepared: Any, verb: str) -> None:
    if not isinstance(prepared, PreparedModel):
        raise ArgumentTypeError(f"{verb}() takes the PreparedModel that hub_dfq.prepare(model, config) returns, got "
                                f"{type(prepared).__name__}")
    if prepared.stage not in _ACCEPTS[verb]:
        hint = {"prepared": "its ranges are not set yet: run hub_dfq.calibrate(prepared, batches) first",
                "applied": f"{prepared.algorithm!r} already ran on it: freeze it with hub_dfq.freeze(prepared), "
                           "or prepare the model again",
                "frozen": "it was frozen into a QuantizedModel already: prepare the model again"}[prepared.stage]
        raise ConfigError(f"cannot {verb} this model: {hint}")


def _device(prepared: PreparedModel) -> torch.device:
    return next((p.device for p in prepared.module.parameters()), torch.device("cpu"))


def default_algorithm(report: PrepareReport) -> str:
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


def quantization_fingerprint(*, weights: str, config: QuantConfig, algorithm: str, settings: dict[str, Any],
                             data: torch.Tensor, seed: int, device_type: str, start: str | None = None) -> str:
    """The fingerprint of a quantization run: what made the model (recorded in its card, keys its resume state).

    ``start`` (the digest of the calibrated graph) is part of it only where the ranges did not come from
    :func:`calibrate` on ``data`` itself, as they do in :func:`hub_dfq.quantize`.
    """
    spec = QUANT_ALGORITHMS.get(algorithm)
    extra = {} if start is None else {"start": start}
    return fingerprint("quantize", version=PIPELINE_VERSION, weights=weights, config=config.to_dict(),
                       algorithm=algorithm, algorithm_version=spec.version, settings=settings, data=data, seed=seed,
                       device_type=device_type, **extra)


def prepare(model: VisionModel, config: QuantConfig | None = None) -> PreparedModel:
    """Make ``model`` a fake-quant graph: BN folded, conv/linear layers swapped, quantizers placed; nothing calibrated.

    Args:
        model: the float model (from :func:`hub_dfq.load_model`); it is not modified.
        config: which layers get which scheme (default: ``QuantConfig()``).

    Returns:
        A :class:`PreparedModel`; :func:`calibrate` is next.

    Raises:
        ArgumentTypeError: ``model`` is not a :class:`~hub_dfq.VisionModel`.
        UnsupportedModelError: a model that is already quantized, cannot be traced or has no conv/linear layer.
        ConfigError: an override that matches no layer, or nothing left to quantize.

    Example:
        >>> prepared = hub_dfq.prepare(hub_dfq.load_model("default"), QuantConfig(default=QuantScheme(weights=4)))
        >>> prepared.report.quantized["layer1.0.conv1"]["weights"], prepared.report.quantized["linear"]["weights"]
        (4, 8)
    """
    if not isinstance(model, VisionModel):
        raise ArgumentTypeError(f"prepare() takes a VisionModel, got {type(model).__name__}: load it with "
                                "hub_dfq.load_model(spec) first")
    if model.quantization_config is not None:
        raise UnsupportedModelError(f"{model.source.spec} is already quantized: quantize its base model "
                                    f"({model.quantization_config.get('base_model', 'see its card')}) instead")
    config = config if config is not None else QuantConfig()
    graph = prepare_graph(model.module, config, example_input=model.example_input(1), hints=model.tracing_hints)
    return PreparedModel(model=model, config=config, module=graph.module, report=graph.report,
                         node_blocks=graph.node_blocks)


@contextlib.contextmanager
def calibrating(prepared: PreparedModel, *, seed: int = 0,
                source: Mapping[str, Any] | None = None) -> Iterator[fx.GraphModule]:
    """Calibrate with a forward loop of your own: inside the block, calls of the module it yields run in full
    precision and feed the observers; on leaving it, weight scales and activation ranges are set.

    Args:
        prepared: from :func:`prepare` (or calibrated already: this calibrates it again).
        seed: seed of the observers' value sampling.
        source: where the data came from, for the model card (default ``{"kind": "custom"}``).

    Raises:
        ConfigError: a model past calibration (an algorithm ran on it, or it is frozen).
        ValueError: (on leaving) a quantizer saw no values: the loop never reached it.

    Example:
        >>> with hub_dfq.calibrating(prepared) as module:
        ...     for pixels in my_batches():
        ...         module(pixels)
    """
    _check_stage(prepared, "calibrate")
    calibrate_weights(prepared.module)  # from the weights alone: no data needed
    prepared.stage = "prepared"  # until the ranges are set
    with observe_activations(prepared.module, seed=seed):
        yield prepared.module
    prepared.stage = "calibrated"
    prepared.calibration = dict(source) if source is not None else {"kind": "custom"}
    prepared._calibrated_with = None


def calibrate(prepared: PreparedModel, batches: torch.Tensor | Iterable[torch.Tensor], *,
              batch_size: int = CALIBRATION_BATCH, seed: int = 0, progress: bool | None = None,
              source: Mapping[str, Any] | None = None) -> PreparedModel:
    """Set the weight scales and, from a full-precision pass over ``batches``, the activation ranges.

    Args:
        prepared: from :func:`prepare`.
        batches: normalised pixels ``(N, C, H, W)``: one tensor (observed ``batch_size`` rows at a time) or any
            iterable of batches (a data loop of your own, a generator). For a loop that does more than forward
            passes, use :func:`calibrating`.
        batch_size: rows per forward pass when ``batches`` is one tensor.
        seed: seed of the observers' value sampling.
        progress: show a progress bar (``None``: on a terminal).
        source: where the data came from, for the model card (default ``{"kind": "tensor", "n": images}``).

    Returns:
        ``prepared``, calibrated; :func:`apply` or :func:`freeze` is next.

    Raises:
        ConfigError: a model past calibration (an algorithm ran on it, or it is frozen).
        DatasetError: no images.
        ValueError: a quantizer saw no values (the data never reached it).

    Example:
        >>> hub_dfq.calibrate(prepared, (preprocess(images) for images, _ in loader))
    """
    whole = batches if isinstance(batches, torch.Tensor) else None
    if whole is not None:
        batches = list(whole.split(batch_size))
    device, seen = _device(prepared), 0
    with calibrating(prepared, seed=seed) as module:
        for batch in tqdm(batches, desc="calibrate", disable=not progress_enabled(progress), leave=False):
            module(batch.to(device))
            seen += len(batch)
        if not seen:
            raise DatasetError("calibrate() got no images")
    prepared.calibration = dict(source) if source is not None else {"kind": "tensor", "n": seen}
    if whole is not None and batch_size == CALIBRATION_BATCH:
        prepared._calibrated_with = (weakref.ref(whole), whole._version, seed, weights_sha256(prepared.module))
    return prepared


def _start_digest(prepared: PreparedModel, data: torch.Tensor, seed: int) -> str | None:
    """``None`` where the ranges are quantize's (this very tensor calibrated them, nothing changed since), else the
    digest of the calibrated graph, which then keys the run instead of the calibration data."""
    start = weights_sha256(prepared.module)
    if prepared._calibrated_with is not None:
        ref, version, calibration_seed, calibrated = prepared._calibrated_with
        if ref() is data and data._version == version and calibration_seed == seed and calibrated == start:
            return None
    return start


def apply(prepared: PreparedModel, algorithm: str, batches: torch.Tensor | Iterable[torch.Tensor], *,
          settings: Any = None, preset: str | Preset = "fast", seed: int = 0, progress: bool | None = None,
          resume: bool = False, runner: Runner | None = None) -> PreparedModel:
    """Run a registered quantization algorithm on the calibrated model (in place).

    Args:
        prepared: calibrated by :func:`calibrate` or :func:`calibrating`.
        algorithm: a registered algorithm (``"calibrate"``: nothing more, ``"gptq"``, ``"reconstruct"``,
            ``"distill"``; see :mod:`hub_dfq.quant.registry`) or ``"auto"`` (:func:`default_algorithm`).
        batches: normalised pixels to fit on: one tensor or an iterable of batches (joined into one).
        settings: the algorithm's settings dataclass, or ``{algorithm name: settings dataclass or {field: value}}``
            as :func:`hub_dfq.quantize` takes them; over the preset's.
        preset: a registered preset (or a :class:`~hub_dfq.quant.registry.Preset`) whose settings come first.
        seed: seed of the algorithm.
        progress: show progress bars (``None``: on a terminal).
        resume: save the progress of a resumable algorithm in the cache and continue an interrupted run of the
            same inputs where it stopped.
        runner: the processes that share the run (default: :class:`~hub_dfq.runner.Runner` over the process
            group of the environment): distillation splits each batch over them, rank 0 saves the progress.

    Returns:
        ``prepared``, with ``algorithm``, ``algorithm_config``, ``history`` and ``fingerprint`` set;
        :func:`freeze` is next.

    Raises:
        ConfigError: a model not calibrated yet (or past this stage); an unknown algorithm, preset or setting.
        DatasetError: no images.

    Example:
        >>> hub_dfq.apply(prepared, "gptq", pixels, settings={"gptq": {"damp": 0.02}})
    """
    _check_stage(prepared, "apply")
    if algorithm == AUTO:
        algorithm = default_algorithm(prepared.report)
    spec = QUANT_ALGORITHMS.get(algorithm)
    if settings is not None and not isinstance(settings, Mapping):  # one algorithm's settings object
        settings = {algorithm: settings}
    settings_of = settings_resolver(PRESETS.get(preset) if isinstance(preset, str) else preset, settings, seed=seed)
    run_settings = settings_of(algorithm)
    data = batches if isinstance(batches, torch.Tensor) else torch.cat(list(batches))
    if len(data) == 0:
        raise DatasetError("apply() got no images")
    data = data.to(_device(prepared))
    model = prepared.model
    config = recorded_settings(algorithm, settings_of)
    run = quantization_fingerprint(weights=weights_sha256(model.module), config=prepared.config, algorithm=algorithm,
                                   settings=config, data=data, seed=seed, device_type=model.device.type,
                                   start=_start_digest(prepared, data, seed))
    state = RunState.for_run(version=PIPELINE_VERSION, run=run, runner=runner) if resume and spec.resumable else None
    context = AlgorithmContext(module=prepared.module, node_blocks=prepared.node_blocks, data=data,
                               settings=run_settings, seed=seed, progress=progress, state=state,
                               settings_of=settings_of, runner=runner)
    with state.locked() if state is not None else contextlib.nullcontext():
        history = run_algorithm(algorithm, context)
        if state is not None:
            state.clear()  # the model is complete: nothing left to resume
    prepared.stage, prepared.algorithm, prepared.algorithm_config = "applied", algorithm, config
    prepared.history, prepared.fingerprint = history, run
    return prepared


def freeze(prepared: PreparedModel) -> QuantizedModel:
    """Fix the integer weights (hard rounding) and hand the model over as a :class:`~hub_dfq.QuantizedModel`.

    ``prepared`` is spent: its module now belongs to the quantized model. A model frozen without :func:`apply`
    records the algorithm ``"calibrate"`` (ranges only).

    Raises:
        ConfigError: a model not calibrated yet, or frozen already.

    Example:
        >>> qmodel = hub_dfq.freeze(prepared)
        >>> hub_dfq.save_pretrained(qmodel, "resnet20-w4a8")
    """
    _check_stage(prepared, "freeze")
    freeze_weights(prepared.module)
    prepared.module.eval()
    prepared.stage = "frozen"
    history = dict(prepared.history)
    if prepared.fingerprint is not None:
        history["fingerprint"] = prepared.fingerprint
    return QuantizedModel(module=prepared.module, config=prepared.config, model=prepared.model,
                          calibration=prepared.calibration, algorithm=prepared.algorithm or "calibrate",
                          algorithm_config=prepared.algorithm_config, report=prepared.report, history=history)
