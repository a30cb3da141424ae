"""Real integer inference: export a quantized model to ONNX in QDQ form and run it with ONNX Runtime.

The exported graph is the simulated model written in ONNX's quantization operators, so that ONNX
Runtime replaces every ``DequantizeLinear -> Conv/Gemm/MatMul/Add -> QuantizeLinear`` group by one
integer kernel (``QLinearConv``, ``QGemm``, ``QLinearAdd``; int8 weights, uint8 activations, int32
accumulation — VNNI on AVX-512 CPUs):

- weights are ``int8`` initializers read through a per-channel ``DequantizeLinear``; weights below
  8 bits are stored on their own narrower grid inside ``int8`` (the values are the same);
- biases are ``int32`` on the ``input_scale * weight_scale`` grid, as the simulation rounds them;
- every activation quantizer becomes ``QuantizeLinear -> DequantizeLinear`` (``uint8``, the
  simulation's scale and zero point). Below 8 bits a ``Clip`` on the ``uint8`` values keeps the
  narrower grid; it works in the integer domain, so the producing layer still fuses. (ONNX ``uint4``
  would say it directly, but ONNX Runtime has no integer convolution for it.)

Integer kernels accumulate exactly and requantize once, where the simulation sums dequantized
values in float32; the two can differ by one step of an activation grid where a value sits on a
rounding boundary, so logits agree closely but not bit for bit (:func:`compare_onnx` measures it).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import (
    ArgumentTypeError,
    CheckpointError,
    ConfigError,
    DependencyError,
    UnsupportedModelError,
)
from ..locks import hold
from ..outputs import check_file, write_file
from ..quant.integer import ActivationGrid, IntegerLayer
from ..quant.model import QuantizedModel
from .compare import EngineClassifier, compare_logits

__all__ = ["ONNX_NAME", "OnnxClassifier", "compare_onnx", "export_onnx", "load_onnx", "runtime_ops"]

ONNX_NAME = "model.onnx"


def _require_onnxruntime():
    try:  # why: onnx and onnxruntime are an optional extra ('hub-dfq[onnx]')
        import onnxruntime
    except ImportError as err:
        raise DependencyError("ONNX export and integer inference need onnx and onnxruntime: "
                              "pip install 'hub-dfq[onnx]'") from err
    return onnxruntime


class _QuantizeDequantize(torch.autograd.Function):
    """Fake quantization in PyTorch, ``QuantizeLinear -> DequantizeLinear`` (uint8) in ONNX."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        q = torch.round(x / scale)
        if zero_point:  # no "+ 0": TorchScript's peephole pass drops it inside this op and then fails
            return (torch.clamp(q + zero_point, qmin, qmax) - zero_point) * scale
        return torch.clamp(q, qmin, qmax) * scale

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmin, qmax):
        scale_c = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        zp = g.op("Constant", value_t=torch.tensor(zero_point, dtype=torch.uint8))
        q = g.op("QuantizeLinear", x, scale_c, zp)
        if (qmin, qmax) != (0, 255):
            # A narrower grid (below 8 bits): clip the integers. Clip works on uint8 in the integer
            # domain, so the producer still fuses into an integer kernel and no float pass is added.
            q = g.op("Clip", q, g.op("Constant", value_t=torch.tensor(qmin, dtype=torch.uint8)),
                     g.op("Constant", value_t=torch.tensor(qmax, dtype=torch.uint8)))
        return g.op("DequantizeLinear", q, scale_c, zp)


class _Dequantize(torch.autograd.Function):
    """``values * scale`` (per channel along ``axis``) in PyTorch, ``DequantizeLinear`` of an integer
    initializer in ONNX."""

    @staticmethod
    def forward(ctx, values, scale, axis=0):
        shape = [1] * values.dim()
        shape[axis] = -1
        return values.to(torch.float32) * scale.view(shape)

    @staticmethod
    def symbolic(g, values, scale, axis=0):
        zero_type = torch.int8 if values.type().scalarType() == "Char" else torch.int32
        channels = values.type().sizes()[axis]
        zero = g.op("Constant", value_t=torch.zeros(channels, dtype=zero_type))
        return g.op("DequantizeLinear", values, scale, zero, axis_i=axis)


def _onnx_pads(padding: tuple[int, ...], pre_pad: tuple[int, ...] | None) -> list[int]:
    """ONNX ``Conv`` pads (all begins, then all ends): a symmetric ``padding`` plus a zero ``pre_pad`` (F.pad order)."""
    begins, ends = list(padding), list(padding)
    if pre_pad is not None:
        dims = len(padding)
        for i in range(dims):  # F.pad lists the last dimension first
            begins[dims - 1 - i] += pre_pad[2 * i]
            ends[dims - 1 - i] += pre_pad[2 * i + 1]
    return begins + ends


class _PaddedConv(torch.autograd.Function):
    """A convolution with explicit, possibly asymmetric zero pads: one ONNX ``Conv`` with ``pads``.

    Written as ``Pad -> Conv`` the pad would sit between the input's ``DequantizeLinear`` and the
    convolution and keep ONNX Runtime from fusing an integer kernel; ``Conv``'s own ``pads`` (which
    ``QLinearConv`` fills with the input's zero point) say the same thing and fuse.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, pads, stride, dilation, groups):
        dims = len(stride)
        torch_pads = []
        for i in reversed(range(dims)):
            torch_pads += [pads[i], pads[dims + i]]
        conv = {1: F.conv1d, 2: F.conv2d}[dims]
        return conv(F.pad(x, torch_pads), weight, bias, stride, 0, dilation, groups)

    @staticmethod
    def symbolic(g, x, weight, bias, pads, stride, dilation, groups):
        inputs = [x, weight] if bias is None else [x, weight, bias]
        return g.op("Conv", *inputs, pads_i=list(pads), strides_i=list(stride), dilations_i=list(dilation),
                    group_i=groups)


class _ExportActQuantizer(nn.Module):
    def __init__(self, grid: ActivationGrid):
        super().__init__()
        self.scale, self.zero_point = grid.scale, grid.zero_point
        self.qmin, self.qmax = grid.qmin, grid.qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantizeDequantize.apply(x, self.scale, self.zero_point, self.qmin, self.qmax)


class _ExportWeightLayer(nn.Module):
    """A quantized conv/linear as integer weight + integer bias, dequantized in the graph."""

    def __init__(self, layer: IntegerLayer):
        super().__init__()
        self.linear = not layer.is_conv
        if layer.is_conv:
            self.pre_pad = (layer.pre_pad, layer.pre_pad_mode) if layer.pre_pad is not None else None
            # zero pads, symmetric or not, are the convolution's own ONNX pads (see _PaddedConv)
            self.pads = _onnx_pads(layer.padding, layer.pre_pad) if layer.pre_pad_mode == "constant" else None
            self.conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
            self.conv_fn = {"conv1d": F.conv1d, "conv2d": F.conv2d}[layer.kind]
        self.register_buffer("weight_int", layer.weight_int.clone())
        if self.linear:  # see forward: token inputs multiply a [in, out] weight, as ONNX Runtime's own quantizer writes
            self.register_buffer("weight_int_t", layer.weight_int.t().contiguous())
        self.register_buffer("weight_scale", layer.weight_scale.clone())
        self.register_buffer("bias_int", layer.bias_int)
        if layer.bias_int is not None:
            self.register_buffer("bias_scale", layer.bias_scale)
        else:
            self.register_buffer("bias_float", layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = _Dequantize.apply(self.bias_int, self.bias_scale) if self.bias_int is not None else self.bias_float
        if self.linear and x.dim() > 2:
            # F.linear on tokens exports as MatMul(x, Transpose(DequantizeLinear(w))); ONNX Runtime then
            # cannot always see a constant weight behind the Transpose (a bias-free linear stays float).
            # A DequantizeLinear straight into the MatMul, on the stored [in, out] weight, always fuses.
            out = torch.matmul(x, _Dequantize.apply(self.weight_int_t, self.weight_scale, 1))
            return out if bias is None else out + bias
        weight = _Dequantize.apply(self.weight_int, self.weight_scale)
        if self.linear:
            return F.linear(x, weight, bias)
        if self.pads is not None and self.pre_pad is not None:
            return _PaddedConv.apply(x, weight, bias, self.pads, self.conv["stride"], self.conv["dilation"],
                                     self.conv["groups"])
        if self.pre_pad is not None:
            x = F.pad(x, self.pre_pad[0], mode=self.pre_pad[1])
        return self.conv_fn(x, weight, bias, **self.conv)


def _export_module(qmodel: QuantizedModel) -> nn.Module:
    return qmodel.lower(layer=_ExportWeightLayer, activation=_ExportActQuantizer)


def export_onnx(qmodel: QuantizedModel, path: str | os.PathLike[str], *, batch_size: int | None = None,
                opset: int = 17, overwrite: bool = False) -> Path:
    """Write ``qmodel`` as an ONNX QDQ model that ONNX Runtime runs with integer kernels.

    Args:
        qmodel: a quantized model (from :func:`hub_dfq.quantize` or :func:`hub_dfq.from_pretrained`).
        path: the ``.onnx`` file to write (written to a temporary beside it, then renamed into place).
        batch_size: a fixed batch size; ``None`` makes the batch dimension dynamic.
        opset: ONNX opset (13 or newer: per-channel ``DequantizeLinear``).
        overwrite: replace an existing file at ``path``.

    Returns:
        The written path. Input ``pixel_values`` (normalised, NCHW float32), output ``logits``.

    Raises:
        DependencyError: onnx or onnxruntime is not installed.
        ConfigError: an opset below 13, or a model still being calibrated.
        ArgumentTypeError: ``qmodel`` is not a :class:`QuantizedModel`.
        OutputExistsError: ``path`` exists and ``overwrite`` is false, or it is a folder.
        OutputWriteError: the file cannot be written (read-only folder, disk full); nothing was changed.
        UnsupportedModelError: an operation the TorchScript exporter cannot write at this opset.
    """
    if not isinstance(qmodel, QuantizedModel):
        raise ArgumentTypeError(f"export_onnx takes a QuantizedModel (from hub_dfq.quantize or "
                                f"hub_dfq.from_pretrained), got {type(qmodel).__name__}: quantize the model first")
    if opset < 13:
        raise ConfigError(f"per-channel weight quantization needs ONNX opset >= 13, got {opset}")
    inputs = [qmodel.source.path] if qmodel.source.path else []  # never over the checkpoint it was loaded from
    target = check_file(path, overwrite=overwrite, argument="path", inputs=inputs)
    _require_onnxruntime()
    module = _export_module(qmodel)
    example = qmodel.model.example_input(batch_size or 2).cpu()
    dynamic = None if batch_size else {"pixel_values": {0: "batch"}, "logits": {0: "batch"}}

    def write(partial: Path) -> None:
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
                # The TorchScript exporter, because it honours autograd functions' ``symbolic``: the QDQ
                # nodes are written exactly as the simulation computes them.
                torch.onnx.export(module, (example,), str(partial), dynamo=False, opset_version=opset,
                                  input_names=["pixel_values"], output_names=["logits"], dynamic_axes=dynamic,
                                  do_constant_folding=True)
        except (RuntimeError, TypeError, ValueError, torch.onnx.errors.OnnxExporterError) as err:
            raise UnsupportedModelError(
                f"cannot export {qmodel.source.spec} to ONNX opset {opset} ({type(err).__name__}: {err}); try a "
                "newer opset, or keep the offending layer in float with `exclude` when quantizing") from err

    with hold(target, what="ONNX file", argument="path"):
        check_file(target, overwrite=overwrite, argument="path", inputs=inputs)  # again, now no other run writes it
        write_file(target, write)
    return target


@dataclass
class OnnxClassifier(EngineClassifier):
    """An ONNX Runtime session over an exported classifier: call it like the PyTorch model.

    Args:
        session: the ``onnxruntime.InferenceSession``.
        path: the model file.
    """

    session: Any
    path: Path

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Logits of a normalised NCHW batch."""
        array = self.engine_input(pixel_values)
        (logits,) = self.session.run(["logits"], {"pixel_values": array})
        return torch.from_numpy(logits)


def _session_options(ort: Any, threads: int | None) -> Any:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # its warnings are about the environment, not the model
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def load_onnx(path: str | os.PathLike[str], *, threads: int | None = None,
              disabled_optimizers: Sequence[str] = ()) -> OnnxClassifier:
    """Open an exported model with ONNX Runtime's CPU provider, all graph optimisations on.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (default: ONNX Runtime's choice, one per core).
        disabled_optimizers: ONNX Runtime graph optimisers to leave out (e.g. ``"NhwcTransformer"``).

    Raises:
        DependencyError: onnxruntime is not installed.
        CheckpointError: the file is missing or not a valid ONNX model.
    """
    ort = _require_onnxruntime()
    if not Path(path).is_file():
        raise CheckpointError(f"{path} does not exist: export one with hub_dfq.export_onnx")
    from onnxruntime.capi import (
        onnxruntime_pybind11_state as ort_errors,  # why: only after the import check above
    )

    unreadable = (ort_errors.Fail, ort_errors.InvalidGraph, ort_errors.InvalidProtobuf, ort_errors.InvalidArgument,
                  ort_errors.NotImplemented, ort_errors.RuntimeException, RuntimeError, ValueError)
    try:
        session = ort.InferenceSession(str(path), sess_options=_session_options(ort, threads),
                                       providers=["CPUExecutionProvider"],
                                       disabled_optimizers=list(disabled_optimizers))
    except unreadable as err:  # onnxruntime's own exception types for unreadable graphs (they derive from Exception)
        raise CheckpointError(f"{path} is not a valid ONNX model ({type(err).__name__}: {err}): export it "
                              "again") from err
    return OnnxClassifier(session, Path(path))


def runtime_ops(path: str | os.PathLike[str], *, threads: int | None = 1,
                disabled_optimizers: Sequence[str] = ()) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime actually runs after its fusions (``QLinearConv`` etc.)."""
    graph = optimized_graph(path, threads=threads, disabled_optimizers=disabled_optimizers)
    return dict(sorted(Counter(n.op_type for n in graph.node).items()))


def optimized_graph(path: str | os.PathLike[str], *, threads: int | None = 1,
                    disabled_optimizers: Sequence[str] = ()) -> Any:
    """The ``onnx.GraphProto`` ONNX Runtime actually runs after its graph optimisations (fusions)."""
    import onnx  # why: an optional extra, checked by _require_onnxruntime below

    ort = _require_onnxruntime()
    with tempfile.TemporaryDirectory(prefix="hub-dfq-ort-") as tmp:
        options = _session_options(ort, threads)
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"],
                             disabled_optimizers=list(disabled_optimizers))
        return onnx.load(options.optimized_model_filepath).graph


compare_onnx = compare_logits  # the shared runtime check (hub_dfq.backends.compare), by its ONNX name
