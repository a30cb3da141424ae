"""Real integer inference in OpenVINO: the QDQ graph of :mod:`hub_dfq.backends.onnx` as OpenVINO IR.

OpenVINO reads the ONNX QDQ export as it is (each ``QuantizeLinear -> DequantizeLinear`` pair becomes a
``FakeQuantize``) and its low-precision transformations run every convolution and linear layer whose
input and weights are quantized as a ``u8 x i8`` kernel, whatever reads its output: the kernel
dequantizes its own result. So its placement rules need no output quantizers (ONNX Runtime needs
them after a convolution that a SiLU or a pooling reads); on such models a checkpoint made for
OpenVINO alone has fewer rounding points and still runs every layer integer.

The file is OpenVINO IR (``openvino_model.xml`` and its ``openvino_model.bin``, the names optimum-intel
uses), converted once at export so that deployment needs only ``openvino``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, DependencyError
from ..locks import hold
from ..outputs import check_file, write_file
from ..quant.model import QuantizedModel
from .compare import EngineClassifier
from .onnx import export_onnx

__all__ = ["OPENVINO_NAME", "OpenVINOClassifier", "export_openvino", "load_openvino", "runtime_precisions"]

OPENVINO_NAME = "openvino_model.xml"


def _require_openvino():
    try:  # why: openvino is an optional extra ('hub-dfq[openvino]')
        import openvino
    except ImportError as err:
        raise DependencyError("OpenVINO export and integer inference need openvino: "
                              "pip install 'hub-dfq[openvino]'") from err
    return openvino


def weights_path(path: str | os.PathLike[str]) -> Path:
    """The ``.bin`` OpenVINO reads beside an IR ``.xml`` (same stem)."""
    return Path(path).with_suffix(".bin")


def export_openvino(qmodel: QuantizedModel, path: str | os.PathLike[str], *, batch_size: int | None = None,
                    opset: int = 17, overwrite: bool = False) -> Path:
    """Write ``qmodel`` as OpenVINO IR that OpenVINO's CPU plugin runs with int8 kernels.

    Args:
        qmodel: a quantized model (best made with ``placement=BACKENDS.get("openvino").placement``).
        path: the ``.xml`` file to write; its weights go to the ``.bin`` beside it.
        batch_size: a fixed batch size; ``None`` makes the batch dimension dynamic.
        opset: the ONNX opset of the intermediate QDQ graph (13 or newer).
        overwrite: replace existing files at ``path`` and its ``.bin``.

    Returns:
        The ``.xml`` path. Input ``pixel_values`` (normalised, NCHW float32), output ``logits``.

    Raises:
        DependencyError: openvino (or onnx) is not installed.
        OutputExistsError: ``path`` or its ``.bin`` exists and ``overwrite`` is false.
        (and the errors of :func:`hub_dfq.export_onnx`)
    """
    ov = _require_openvino()
    inputs = [qmodel.source.path] if isinstance(qmodel, QuantizedModel) and qmodel.source.path else []
    target = check_file(path, overwrite=overwrite, argument="path", inputs=inputs)
    weights = check_file(weights_path(target), overwrite=overwrite, argument="path", inputs=inputs)
    with tempfile.TemporaryDirectory(prefix="hub-dfq-openvino-") as tmp:
        onnx_file = export_onnx(qmodel, Path(tmp) / "model.onnx", batch_size=batch_size, opset=opset)
        # float32 weights kept as they are: fp16 compression would move the dequantization scales off the
        # simulated grid
        ov_model = ov.convert_model(str(onnx_file))
        _stable_names(ov_model)
        ov.save_model(ov_model, str(Path(tmp) / "model.xml"), compress_to_fp16=False)
        with hold(target, what="OpenVINO file", argument="path"):
            check_file(target, overwrite=overwrite, argument="path", inputs=inputs)
            # the weights first: a reader that finds the new .xml finds its .bin
            write_file(weights, lambda partial: shutil.copyfile(Path(tmp) / "model.bin", partial))
            write_file(target, lambda partial: shutil.copyfile(Path(tmp) / "model.xml", partial))
    return target


_GENERATED_NAME = re.compile(r"[A-Za-z]+_\d+(\.\d+)?")


def _stable_names(model: Any) -> None:
    """Number the nodes OpenVINO named itself by their place in the graph, not by a process-wide counter, so that
    the same model exports to the same bytes (``Constant_34249`` in one run is ``Constant_26088`` in the next)."""
    for index, op in enumerate(model.get_ordered_ops()):
        if _GENERATED_NAME.fullmatch(op.get_friendly_name()):
            op.set_friendly_name(f"{op.get_type_name()}_{index}")


@dataclass
class OpenVINOClassifier(EngineClassifier):
    """An OpenVINO compiled model over an exported classifier: call it like the PyTorch model.

    Args:
        compiled: the ``openvino.CompiledModel``.
        path: the IR file.
    """

    compiled: Any
    path: Path

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Logits of a normalised NCHW batch."""
        array = self.engine_input(pixel_values)
        return torch.from_numpy(self.compiled(array)[0].copy())


def load_openvino(path: str | os.PathLike[str], *, threads: int | None = None) -> OpenVINOClassifier:
    """Compile an exported model for OpenVINO's CPU plugin.

    Args:
        path: the IR ``.xml`` (or an ONNX QDQ file, which OpenVINO reads too).
        threads: inference threads (default: OpenVINO's choice).

    Raises:
        DependencyError: openvino is not installed.
        CheckpointError: the file is missing or not a model OpenVINO can read.
    """
    ov = _require_openvino()
    if not Path(path).is_file():
        raise CheckpointError(f"{path} does not exist: export one with `hub-dfq export --backend openvino`")
    # f32 for what stays float: on CPUs with bf16 OpenVINO would otherwise run those parts in bf16, off the
    # simulated model; the int8 kernels are chosen by the graph, not by this hint
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        compiled = ov.Core().compile_model(str(path), "CPU", config)
    except RuntimeError as err:
        raise CheckpointError(f"{path} is not a model OpenVINO can read ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}): export it again") from err
    return OpenVINOClassifier(compiled, Path(path))


def runtime_precisions(classifier: OpenVINOClassifier) -> dict[str, int]:
    """``"LayerType:precision"`` counts of the graph OpenVINO actually runs (``Convolution:u8`` is an int8 kernel)."""
    counts = Counter()
    for op in classifier.compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        counts[f"{info['layerType'].astype(str)}:{info['runtimePrecision'].astype(str)}"] += 1
    return dict(sorted(counts.items()))
