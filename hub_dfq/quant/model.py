"""`QuantizedModel`: the simulated-integer classifier and its public integer state.

The module computes, in float, exactly what the integer model computes. Backends (ONNX Runtime) read
the integer model through :meth:`QuantizedModel.integer_layers`, :meth:`~QuantizedModel.activation_grids`
and :meth:`~QuantizedModel.lower`; the Hub layer (:mod:`hub_dfq.hub.checkpoint`) stores
:meth:`~QuantizedModel.checkpoint_tensors` and rebuilds with :meth:`~QuantizedModel.from_checkpoint`.
Nothing here knows about files, cards or the Hub: :meth:`~QuantizedModel.save_pretrained`,
:meth:`~QuantizedModel.push_to_hub` and :meth:`~QuantizedModel.from_pretrained` call the Hub format
registered under :attr:`~QuantizedModel.hub_format` (:mod:`hub_dfq.formats` says why and how).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Sequence

import torch
from PIL import Image
from torch import fx, nn

from ..errors import CheckpointError, ConfigError
from ..formats import hub_verb
from ..models.adapters import TracingHints
from ..models.vision_model import VisionModel
from .config import QuantConfig
from .integer import ActivationGrid, IntegerLayer
from .modules import act_quantizers, quant_layers
from .packing import pack, unpack
from .prepare import PrepareReport, prepare

if TYPE_CHECKING:
    from ..publish import PushResult

__all__ = ["QuantizedModel", "rebuild_module", "WEIGHT_INT_SUFFIX"]

WEIGHT_INT_SUFFIX = ".weight_quantizer.weight_int"
WEIGHT_LOW_SUFFIX = ".weight_quantizer.low"  # an asymmetric grid's lowest integer per output channel


@dataclass
class QuantizedModel:
    """A quantized classifier: the simulated-integer module plus everything needed to use and publish it.

    Args:
        module: ``torch.fx.GraphModule`` computing, in float, exactly what the integer model computes.
        config: the quantization config it was made with.
        model: the full-precision source model (preprocessing, labels, provenance).
        calibration: where the calibration data came from (dataset spec or synthesis method and args).
        algorithm: the quantization algorithm (``"calibrate"``, ``"reconstruct"``, ``"distill"``, ...).
        algorithm_config: settings of the algorithm.
        report: what was quantized, folded and left in float.
        history: per-block reconstruction losses, distillation losses, timings, fingerprint.
    """

    module: fx.GraphModule
    config: QuantConfig
    model: VisionModel
    calibration: dict[str, Any]
    algorithm: str
    algorithm_config: dict[str, Any] = field(default_factory=dict)
    report: PrepareReport = field(default_factory=PrepareReport)
    history: dict[str, Any] = field(default_factory=dict)

    hub_format: ClassVar[str] = "quantized-model"  # the Hub format its save/push/load verbs use

    # ---- what it is ------------------------------------------------------------------------------
    @property
    def preprocess(self):
        return self.model.preprocess

    @property
    def labels(self) -> list[str]:
        return self.model.labels

    @property
    def source(self):
        return self.model.source

    @property
    def method(self) -> str:
        """Former name of :attr:`algorithm`."""
        return self.algorithm

    @property
    def method_config(self) -> dict[str, Any]:
        """Former name of :attr:`algorithm_config`."""
        return self.algorithm_config

    @property
    def device(self) -> torch.device:
        return self.model.device

    def to(self, device: str | torch.device) -> "QuantizedModel":
        """Move the integer model and its float source model to ``device`` (in place)."""
        self.model.to(device)
        self.module.to(device)
        return self

    @property
    def left_in_float(self) -> list[str]:
        """Layers with parameters that stay in floating point, and why."""
        return sorted(set(self.report.unsupported) | set(self.report.excluded) | set(self.report.float_by_design))

    # ---- inference -------------------------------------------------------------------------------
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
        from ..evaluation import (
            evaluate_accuracy,  # why: evaluation reads datasets, which costs a second to import
        )

        return evaluate_accuracy(self.model, data, forward=self, **kwargs)

    def as_vision_model(self, quantization_config: dict[str, Any] | None = None) -> VisionModel:
        """A :class:`VisionModel` whose module is this integer model (for evaluation and audits of it)."""
        return VisionModel(module=self.module, preprocess=self.preprocess, labels=self.labels, source=self.source,
                           config=dict(self.model.config), library_model=None,
                           quantization_config=quantization_config or {"weights": self.config.default.weights,
                                                                        "activations": self.config.default.activations,
                                                                        "algorithm": self.algorithm})

    # ---- the integer state -----------------------------------------------------------------------
    def integer_layers(self) -> list[IntegerLayer]:
        """Every quantized convolution and linear layer as integers, in graph order."""
        grid_of = {id(q): name for name, q in act_quantizers(self.module)}
        return [layer.integer_layer(name, grid_of.get(id(layer.input_quantizer)))
                for name, layer in quant_layers(self.module) if layer.weight_quantizer.enabled]

    def activation_grids(self) -> list[ActivationGrid]:
        """Every activation quantizer's integer grid, in graph order.

        Raises:
            ConfigError: a quantizer is still observing (the model is not calibrated).
        """
        grids = []
        for name, q in act_quantizers(self.module):
            if q.mode == "observe":
                raise ConfigError(f"activation quantizer {name} is still observing: calibrate the model first")
            if q.mode == "quant":
                grids.append(q.grid(name))
        return grids

    def integer_state(self) -> dict[str, torch.Tensor]:
        """The integer model as flat tensors: per layer ``weight_int`` (int8), ``weight_scale``, ``bias_int``
        (int32) or ``bias`` (float); per activation quantizer ``scale`` and ``zero_point``."""
        state: dict[str, torch.Tensor] = {}
        for layer in self.integer_layers():
            state[f"{layer.name}.weight_int"] = layer.weight_int
            state[f"{layer.name}.weight_scale"] = layer.weight_scale
            if layer.bias_int is not None:
                state[f"{layer.name}.bias_int"] = layer.bias_int
            if layer.bias is not None:
                state[f"{layer.name}.bias"] = layer.bias
        for grid in self.activation_grids():
            state[f"{grid.name}.scale"] = torch.tensor(grid.scale)
            state[f"{grid.name}.zero_point"] = torch.tensor(grid.zero_point, dtype=torch.int32)
        return state

    def lower(self, *, layer: Callable[[IntegerLayer], nn.Module],
              activation: Callable[[ActivationGrid], nn.Module]) -> fx.GraphModule:
        """A copy of the graph with every quantized layer and activation quantizer replaced by what
        ``layer`` and ``activation`` build from its integer description (the seam for backends)."""
        gm = copy.deepcopy(self.module).eval()
        lowered = QuantizedModel(gm, self.config, self.model, self.calibration, self.algorithm)
        for description in lowered.integer_layers():
            gm.set_submodule(description.name, layer(description))
        for grid in lowered.activation_grids():
            gm.set_submodule(grid.name, activation(grid))
        return gm

    # ---- checkpoint tensors ----------------------------------------------------------------------
    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores to rebuild this model bit-exactly: the module's state without the
        float weights of quantized layers, which are replaced by their integers (packed below 5 bits)."""
        state = self.module.state_dict()
        for name, layer in quant_layers(self.module):
            wq = layer.weight_quantizer
            if not wq.frozen:
                wq.freeze(layer.weight)
            state.pop(f"{name}.weight", None)  # rebuilt as weight_int * scale
            state[f"{name}{WEIGHT_INT_SUFFIX}"] = pack(wq.weight_int, wq.bits, low=wq.low)
        return {key: value.detach().cpu().contiguous() for key, value in state.items()}

    @classmethod
    def from_checkpoint(cls, model: VisionModel, config: QuantConfig, tensors: dict[str, torch.Tensor], *,
                        calibration: dict[str, Any] | None = None, algorithm: str = "calibrate",
                        algorithm_config: dict[str, Any] | None = None,
                        history: dict[str, Any] | None = None) -> "QuantizedModel":
        """Rebuild a model from :meth:`checkpoint_tensors` on its float architecture (weights frozen).

        Raises:
            CheckpointError: the tensors do not match the architecture and config.
        """
        gm, report = rebuild_module(model.module, config, tensors, model.example_input(1),
                                    hints=model.tracing_hints)
        return cls(gm, config, model, dict(calibration or {}), algorithm, dict(algorithm_config or {}), report,
                   dict(history or {}))

    # ---- on the Hub (the format is the Hub layer's: see hub_dfq.formats) ------------------------------
    def save_pretrained(self, out_dir: str | os.PathLike[str], *, overwrite: bool = False, repo_id: str | None = None,
                        evaluation: dict[str, Any] | None = None, command: str | None = None,
                        calibration_repo: str | None = None, backends: Sequence[str] = (),
                        onnx: bool | None = None) -> Path:
        """Write this model as a Hub model repo folder: integer safetensors, ``config.json``, model card.

        The same code and bytes as :func:`hub_dfq.save_pretrained` ``(self, out_dir, ...)``, which documents
        the arguments and errors: the folder is new or empty, or (with ``overwrite``) one hub-dfq wrote.

        Example:
            >>> qmodel = hub_dfq.quantize("default", weights=4, activations=8)  # doctest: +SKIP
            >>> qmodel.save_pretrained("resnet20-w4a8")  # doctest: +SKIP
        """
        return hub_verb(self.hub_format, "save_pretrained")(
            self, out_dir, overwrite=overwrite, repo_id=repo_id, evaluation=evaluation, command=command,
            calibration_repo=calibration_repo, backends=backends, onnx=onnx)

    def push_to_hub(self, repo_id: str, *, private: bool = False, token: str | bool | None = None,
                    revision: str | None = None, evaluation: dict[str, Any] | None = None, command: str | None = None,
                    calibration_folder: str | os.PathLike[str] | None = None, dataset_repo: str | None = None,
                    backends: Sequence[str] = (), onnx: bool | None = None) -> "PushResult":
        """Publish this model as a Hub model repo in one commit (and its calibration set, with ``dataset_repo``).

        The same code and bytes as :func:`hub_dfq.push_to_hub` ``(self, repo_id, ...)``, which documents the
        arguments and errors.

        Example:
            >>> qmodel.push_to_hub("me/resnet20-w4a8-dfq")  # doctest: +SKIP
        """
        return hub_verb(self.hub_format, "push_to_hub")(
            self, repo_id, private=private, token=token, revision=revision, evaluation=evaluation, command=command,
            calibration_folder=calibration_folder, dataset_repo=dataset_repo, backends=backends, onnx=onnx)

    @classmethod
    def from_pretrained(cls, spec: str | os.PathLike[str], *, revision: str | None = None,
                        token: str | bool | None = None, device: str | torch.device | None = None) -> "QuantizedModel":
        """Load a quantized checkpoint from a folder or the Hub (bit-identical logits): :func:`hub_dfq.from_pretrained`.

        Example:
            >>> qmodel = hub_dfq.QuantizedModel.from_pretrained("me/resnet20-w4a8-dfq")  # doctest: +SKIP
        """
        return hub_verb(cls.hub_format, "from_pretrained")(spec, revision=revision, token=token, device=device)

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable description: config, calibration provenance, algorithm, layers."""
        return {
            "source": self.source.spec,
            "config": self.config.to_dict(),
            "calibration": self.calibration,
            "algorithm": self.algorithm,
            "algorithm_config": self.algorithm_config,
            "report": self.report.to_dict(),
            "history": self.history,
        }


def rebuild_module(float_module: nn.Module, config: QuantConfig, tensors: dict[str, torch.Tensor],
                   example_input: torch.Tensor, *,
                   hints: TracingHints | None = None) -> tuple[fx.GraphModule, PrepareReport]:
    """Prepare ``float_module`` with ``config`` and load :meth:`QuantizedModel.checkpoint_tensors` into it
    (``hints``: the model family's, see :func:`~hub_dfq.quant.prepare.prepare`).

    Raises:
        CheckpointError: the tensors do not match the architecture and config.
    """
    prepared = prepare(float_module, config, example_input=example_input, strict=False, hints=hints)
    gm = prepared.module
    tensors = dict(tensors)
    try:
        with torch.no_grad():
            for name, layer in quant_layers(gm):
                wq = layer.weight_quantizer
                low = tensors.pop(f"{name}{WEIGHT_LOW_SUFFIX}", None)
                if low is not None and not wq.symmetric:  # one missing or extra: the loader's consistency check says
                    wq.low.copy_(low)
                wq.weight_int = unpack(tensors.pop(f"{name}{WEIGHT_INT_SUFFIX}"), wq.bits, layer.weight.shape,
                                       low=wq.low)
                wq.scale.copy_(tensors.pop(f"{name}.weight_quantizer.scale"))
                layer.weight.copy_(wq.weight_int.to(layer.weight.dtype) * wq._view(wq.scale, layer.weight))
        missing, unexpected = gm.load_state_dict(tensors, strict=False)
    except (KeyError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"the checkpoint does not match its architecture and quantization config: {err}") from err
    handled = {f"{name}{suffix}" for name, _ in quant_layers(gm)
               for suffix in (".weight", WEIGHT_INT_SUFFIX, WEIGHT_LOW_SUFFIX, ".weight_quantizer.scale")}
    missing = [k for k in missing if k not in handled]
    if missing or unexpected:
        raise CheckpointError(f"the checkpoint does not match its architecture: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    for _, q in act_quantizers(gm):
        q.mode = "quant"
        q.calibrated = True
    return gm.eval(), prepared.report
