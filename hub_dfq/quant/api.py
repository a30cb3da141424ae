"""``quantize``: one verb from a float :class:`VisionModel` to a :class:`QuantizedModel`."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

import torch
from PIL import Image
from torch import fx

from ..errors import ConfigError
from ..models.vision_model import VisionModel
from .calibrate import act_quantizers, calibrate_activations, calibrate_weights, freeze_weights, quant_layers
from .config import QuantConfig, QuantScheme
from .data import SYNTHETIC_METHODS, calibration_tensor
from .distill import DistillConfig, distill
from .prepare import PrepareReport, prepare
from .reconstruct import ReconstructConfig, reconstruct
from .resume import RunState

logger = logging.getLogger(__name__)

__all__ = ["quantize", "QuantizedModel", "METHODS", "PRESETS", "Preset"]

METHODS = ("calibrate", "reconstruct", "distill")


@dataclass(frozen=True)
class Preset:
    """Budgets of one speed/accuracy trade-off.

    Args:
        calibration_size: images used when the caller does not say.
        synth: options of on-the-fly synthesis (:func:`hub_dfq.synth.synthesize`).
        reconstruct: block reconstruction settings.
        distill: distillation settings.
    """

    calibration_size: int
    synth: Mapping[str, Any]
    reconstruct: ReconstructConfig
    distill: DistillConfig


PRESETS: dict[str, Preset] = {
    # ResNet-20 W4A4 in about 5 minutes on 2 CPU cores, synthesis included.
    "fast": Preset(256, {"iters": 200, "batch_size": 128}, ReconstructConfig(iters=300, batch_size=32),
                   DistillConfig(iters=300, batch_size=64)),
    # 4x the images (the lever that pays: ResNet-20 W4A4 -0.61 -> -0.33), 3x the fitting steps;
    # distillation starts from a reconstructed model. Synthesis keeps the fast preset's 200 steps:
    # images matched for 500 steps reached a 5x lower BN divergence yet calibrated worse (-0.59).
    "best": Preset(1024, {"iters": 200, "batch_size": 128}, ReconstructConfig(iters=1000, batch_size=32),
                   DistillConfig(iters=1000, batch_size=64, init="reconstruct")),
}


@dataclass
class QuantizedModel:
    """A quantized classifier: the simulated-integer module plus everything needed to use and publish it.

    Args:
        module: ``torch.fx.GraphModule`` computing, in float, exactly what the integer model computes.
        config: the quantization config it was made with.
        model: the full-precision source model (preprocessing, labels, provenance).
        calibration: where the calibration data came from (dataset spec or synthesis method and args).
        method: ``"calibrate"``, ``"reconstruct"`` or ``"distill"``.
        method_config: settings of the method.
        report: what was quantized, folded and left in float.
        history: per-block reconstruction losses, distillation losses, timings.
    """

    module: fx.GraphModule
    config: QuantConfig
    model: VisionModel
    calibration: dict[str, Any]
    method: str
    method_config: dict[str, Any] = field(default_factory=dict)
    report: PrepareReport = field(default_factory=PrepareReport)
    history: dict[str, Any] = field(default_factory=dict)

    @property
    def preprocess(self):
        return self.model.preprocess

    @property
    def labels(self) -> list[str]:
        return self.model.labels

    @property
    def source(self):
        return self.model.source

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Logits of a normalised batch."""
        with torch.no_grad():
            return self.module(pixel_values)

    def predict(self, images: Iterable[Image.Image]) -> list[str]:
        """Top-1 label names for PIL images."""
        logits = self(self.preprocess.batch(images))
        return [self.labels[i] for i in logits.argmax(-1).tolist()]

    def evaluate(self, data: Any, **kwargs: Any) -> dict[str, float | int]:
        """Accuracy on a labelled dataset (see :func:`hub_dfq.evaluate_accuracy`)."""
        from ..evaluation import evaluate_accuracy

        return evaluate_accuracy(self.model, data, forward=self, **kwargs)

    def quant_state(self) -> dict[str, torch.Tensor]:
        """The integer model as tensors: per layer ``weight_int`` (int8), ``weight_scale``, ``bias_int``
        (int32) and ``bias`` (float); per activation quantizer ``scale`` and ``zero_point``."""
        state: dict[str, torch.Tensor] = {}
        for name, layer in quant_layers(self.module):
            wq = layer.weight_quantizer
            if not wq.frozen:
                wq.freeze(layer.weight)
            state[f"{name}.weight_int"] = wq.weight_int.clone()
            state[f"{name}.weight_scale"] = wq.scale.detach().clone()
            if layer.bias is not None:
                state[f"{name}.bias"] = layer.quantized_bias().detach().clone()
                bias_int = layer.bias_int()
                if bias_int is not None:
                    state[f"{name}.bias_int"] = bias_int
        for name, q in act_quantizers(self.module):
            state[f"{name}.scale"] = q.scale.detach().clone()
            state[f"{name}.zero_point"] = q.zero_point.clone()
        return state

    def save_pretrained(self, folder: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Write the published checkpoint format (see :func:`hub_dfq.save_pretrained`)."""
        from ..export import save_pretrained  # export builds on quant, not the other way round

        return save_pretrained(self, folder, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any):
        """Publish as a Hub model repo in one commit (see :func:`hub_dfq.push_to_hub`)."""
        from ..export import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable description: config, calibration provenance, method, layers."""
        return {
            "source": self.source.spec,
            "config": self.config.to_dict(),
            "calibration": self.calibration,
            "method": self.method,
            "method_config": self.method_config,
            "report": self.report.to_dict(),
            "history": self.history,
        }


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


def quantize(
    model: VisionModel | str,
    *,
    weights: int = 4,
    activations: int = 4,
    calibration: Any = "bns",
    calibration_size: int | None = None,
    method: str = "calibrate",
    preset: str = "fast",
    config: QuantConfig | None = None,
    first_last_bits: int | None = 8,
    residual_bits: int | None = 8,
    weight_observer: str = "mse",
    act_observer: str = "mse",
    overrides: Mapping[str, Any] | None = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    reconstruct_config: ReconstructConfig | None = None,
    distill_config: DistillConfig | None = None,
    synth_options: Mapping[str, Any] | None = None,
    seed: int = 0,
    resume: bool = True,
    progress: bool = False,
) -> QuantizedModel:
    """Quantize a classifier to ``weights``/``activations`` bits, calibrated without its training data.

    BN layers are folded into the convolutions; weights are quantized per output channel
    (symmetric), activations per tensor at the input of every conv/linear and at the residual
    additions. The first conv and last linear stay at 8 bits unless ``first_last_bits=None``.

    Args:
        model: a :class:`VisionModel` or a spec for :func:`hub_dfq.load_model`.
        weights: weight bit width (2-8).
        activations: activation bit width (2-8).
        calibration: a synthetic method (``"bns"``, ``"bns+i"``, ``"inception"``, ``"gaussian"``,
            generated on the fly and cached), a dataset spec, an :class:`~hub_dfq.ImageData`, a
            ``datasets.Dataset`` or a tensor of normalised inputs.
        calibration_size: images to calibrate with (default: the preset's; all rows of a tensor).
        method: ``"calibrate"`` (ranges only), ``"reconstruct"`` (block-wise AdaRound + LSQ) or
            ``"distill"`` (knowledge distillation from the full-precision model).
        preset: ``"fast"`` or ``"best"`` budgets.
        config: a full :class:`QuantConfig` (then the bit and observer arguments are ignored).
        first_last_bits: bits of the first and last layers; ``None`` quantizes them like the rest.
        residual_bits: bits of residual-addition operands; ``None`` uses ``activations``.
        weight_observer: ``"mse"`` or ``"minmax"``.
        act_observer: ``"mse"``, ``"percentile"`` or ``"minmax"``.
        overrides: ``{glob: {field: value}}`` per-module scheme changes (mixed precision).
        include: globs of module names to quantize.
        exclude: globs of module names to keep in float.
        reconstruct_config: overrides the preset's reconstruction settings.
        distill_config: overrides the preset's distillation settings.
        synth_options: overrides the preset's synthesis options.
        seed: seed of synthesis, observers, reconstruction and distillation (same seed, same weights).
        resume: save the progress of ``reconstruct``/``distill`` in the cache and continue an
            interrupted run of the same inputs where it stopped (same result as one run).
        progress: show progress bars.

    Returns:
        A :class:`QuantizedModel`.

    Raises:
        ConfigError: bits outside 2-8, unknown method, preset or observer.
        DatasetError: an empty or unreadable calibration set.
        UnsupportedModelError: a model without conv/linear layers or that cannot be traced.

    Example:
        >>> qmodel = hub_dfq.quantize("default", weights=4, activations=4, method="reconstruct")
        >>> qmodel.evaluate("default")["top1"]
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    cfg = _resolve_config(config, weights=weights, activations=activations, first_last_bits=first_last_bits,
                          residual_bits=residual_bits, weight_observer=weight_observer, act_observer=act_observer,
                          overrides=overrides, include=include, exclude=exclude)
    if isinstance(model, str):
        from ..models import load_model

        model = load_model(model)
    chosen = PRESETS[preset]
    start = time.perf_counter()
    timings: dict[str, float] = {}
    prepared = prepare(model.module, cfg, example_input=model.example_input(1))
    synth = {**chosen.synth, **dict(synth_options or {}), "progress": progress}
    # a tensor is data the caller prepared: all of it calibrates unless they say otherwise
    default_size = None if isinstance(calibration, torch.Tensor) else chosen.calibration_size
    data, provenance = calibration_tensor(model, calibration, size=calibration_size or default_size,
                                          seed=seed, synth_options=synth)
    data = data.to(model.device)
    timings["data"] = time.perf_counter() - start
    gm = prepared.module
    calibrate_weights(gm)
    calibrate_activations(gm, data, seed=seed, progress=progress)
    timings["calibrate"] = time.perf_counter() - start - timings["data"]
    history: dict[str, Any] = {}
    method_config: dict[str, Any] = {}
    rcfg = replace(reconstruct_config or chosen.reconstruct, seed=seed)
    dcfg = replace(distill_config or chosen.distill, seed=seed)
    if method == "reconstruct":
        method_config = rcfg.to_dict()
    elif method == "distill":
        method_config = dcfg.to_dict()
        if dcfg.init == "reconstruct":
            method_config["reconstruct"] = rcfg.to_dict()
    state = None
    if resume and method != "calibrate":
        from .. import __version__  # the package imports this module first

        state = RunState.for_run(model=model.module, config=cfg.to_dict(), method=method, method_config=method_config,
                                 data=data, seed=seed, version=__version__)
    if method == "reconstruct" or (method == "distill" and dcfg.init == "reconstruct"):
        history["blocks"] = reconstruct(gm, prepared.node_blocks, data, rcfg, progress=progress, state=state)
    if method == "distill":
        history["distill_loss"] = distill(gm, data, dcfg, progress=progress, state=state)
    if state is not None:
        state.clear()  # the model is complete: nothing left to resume
    freeze_weights(gm)
    gm.eval()
    timings["total"] = time.perf_counter() - start
    history["seconds"] = timings
    provenance = {**provenance, "preset": preset}
    if isinstance(calibration, str) and calibration.lower() in SYNTHETIC_METHODS:
        provenance["synth_options"] = {k: v for k, v in synth.items() if k != "progress"}
    logger.info("quantized %s to W%dA%d with %s in %.1f s", model.source.spec, cfg.default.weights,
                cfg.default.activations, method, timings["total"])
    return QuantizedModel(gm, cfg, model, provenance, method, method_config, prepared.report, history)
