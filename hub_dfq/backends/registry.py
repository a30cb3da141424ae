"""The inference backends: one descriptor each, and the registry checkpoints, cards and the CLI read.

A new backend is one module (an ``export(qmodel, path)`` written against the public integer-state
API of :class:`~hub_dfq.quant.model.QuantizedModel`, and a ``load(path)`` returning a callable
classifier) plus one :func:`register_backend` call stating its placement rules.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import DependencyError
from ..quant.placement import PlacementRules
from ..registry import Registry

__all__ = ["Backend", "BACKENDS", "register_backend"]


@dataclass(frozen=True)
class Backend:
    """One integer inference backend.

    Args:
        name: what users type (``--backend NAME``); also the model card's tag and the ``{name}_top1`` key of
            an evaluation.
        summary: one line for the CLI help and the docs table.
        runtime: the engine's name in messages and cards (``"ONNX Runtime"``).
        file_name: the file it adds to a checkpoint folder.
        export: ``(qmodel, path, *, overwrite, **export_options) -> path``, or its ``"module:attribute"`` path.
        load: ``(path, *, threads) -> classifier`` (a callable from normalised pixels to logits with an
            ``evaluate`` method), or its path.
        placement: where its integer kernels need quantizers; ``prepare`` builds the graph by them.
        check: ``(qmodel, classifier, inputs) -> {"top1_agreement", ...}``, how closely the engine follows the
            simulated model, or its path.
        usage: markdown the model card shows under the file (how to run it).
        requires: the extra to install (``pip install 'hub-dfq[EXTRA]'``), if any.
        modules: the Python packages that extra provides (checked before any work).
        export_options: keyword arguments of ``export`` beyond ``overwrite`` (``hub-dfq export`` passes these).
        sidecars: suffixes of the files written beside the exported one, same stem (OpenVINO's ``.bin``).
        max_bits: the widest integers its kernels take.
    """

    name: str
    summary: str
    runtime: str
    file_name: str
    export: Callable[..., Any] | str
    load: Callable[..., Any] | str
    placement: PlacementRules = field(default_factory=PlacementRules)
    check: Callable[..., Any] | str = "hub_dfq.backends.compare:compare_logits"
    usage: str = ""
    requires: str | None = None
    modules: tuple[str, ...] = ()
    export_options: tuple[str, ...] = ("batch_size",)
    sidecars: tuple[str, ...] = ()
    max_bits: int = 8

    def available(self) -> bool:
        """Whether its packages are installed (found, not imported)."""
        return all(importlib.util.find_spec(module) is not None for module in self.modules)

    def require(self) -> None:
        """Raise a :class:`DependencyError` naming the pip command when its packages are missing."""
        if not self.available():
            raise DependencyError(f"the {self.name} backend ({self.runtime}) needs {', '.join(self.modules)}: "
                                  f"pip install 'hub-dfq[{self.requires}]'")


BACKENDS: Registry[Backend] = Registry("backend", "backend")


def register_backend(backend: Backend, *, overwrite: bool = False) -> Backend:
    """Add an inference backend (see :class:`Backend`)."""
    return BACKENDS.register(backend, overwrite=overwrite)


_ONNX_USAGE = """`model.onnx` is the same integer model as an ONNX QDQ graph: ONNX Runtime runs its convolutions and
linear layers with int8 kernels (input `pixel_values`, normalised NCHW float32; output `logits`).

```python
import hub_dfq

session = hub_dfq.load_onnx("model.onnx")                # or onnxruntime.InferenceSession("model.onnx")
logits = session(pixel_values)
```
"""

_OPENVINO_USAGE = """`openvino_model.xml` (with `openvino_model.bin`) is the same integer model as OpenVINO IR:
OpenVINO's CPU plugin runs its convolutions and linear layers with int8 kernels (input `pixel_values`,
normalised NCHW float32; output `logits`).

```python
import openvino as ov

compiled = ov.Core().compile_model("openvino_model.xml", "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
logits = compiled(pixel_values)[0]
```
"""

register_backend(Backend(
    "onnx", summary="an ONNX QDQ graph that ONNX Runtime runs with int8 kernels (QLinearConv, QGemm, QLinearAdd)",
    runtime="ONNX Runtime", file_name="model.onnx", export="hub_dfq.backends.onnx:export_onnx",
    load="hub_dfq.backends.onnx:load_onnx",
    # ONNX Runtime fuses DequantizeLinear -> Conv/Gemm -> [Relu/Clip] -> QuantizeLinear into one kernel writing
    # integers; a layer whose output a float op reads first runs in float, so it needs an output quantizer.
    # These are the quantization core's default rules (checkpoints made with them do not record them).
    placement=PlacementRules(name="onnxruntime", fused_activations=("relu", "relu6"), output_quantizers=True),
    usage=_ONNX_USAGE, requires="onnx", modules=("onnx", "onnxruntime"), export_options=("batch_size", "opset")))

register_backend(Backend(
    "openvino", summary="OpenVINO IR of the QDQ graph; OpenVINO's CPU plugin runs it with int8 kernels (u8 x i8)",
    runtime="OpenVINO", file_name="openvino_model.xml", export="hub_dfq.backends.openvino:export_openvino",
    load="hub_dfq.backends.openvino:load_openvino",
    # OpenVINO's low-precision transformations run a convolution with quantized input and weights as an int8
    # kernel that dequantizes its own output, whatever reads it: no output quantizers; it fuses these
    # activations (and more) as post-ops.
    placement=PlacementRules(name="openvino", fused_activations=("relu", "relu6", "hardtanh", "silu", "hardswish",
                                                                  "sigmoid", "gelu"), output_quantizers=False),
    usage=_OPENVINO_USAGE, requires="openvino", modules=("openvino", "onnx", "onnxruntime"),
    export_options=("batch_size", "opset"), sidecars=(".bin",)))
