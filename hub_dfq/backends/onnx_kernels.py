"""Which multiply-accumulates ONNX Runtime runs in integer kernels: the share that int8 inference buys.

Op counts (:func:`hub_dfq.backends.onnx.runtime_ops`) treat a 1x1 head convolution like the stem; what
decides speed is where the MACs are. :func:`integer_macs` counts the MACs of every convolution, ``Gemm``
and ``MatMul`` of an exported graph (shapes from one unoptimised run on a zero image) and finds, in the
graph ONNX Runtime actually runs after its fusions, which of them became integer kernels
(``QLinearConv``, ``ConvInteger``, ``QGemm``, ``QLinearMatMul``, ``MatMulInteger``,
``MatMulIntegerToFloat``, ...).

A layer with weights is matched by its integer weight initializer (``<layer>.weight_int``), which the
integer kernel reads directly, or by its values where ONNX Runtime stored a transposed copy; a product
of two activations (attention) by the tensor it produces. Everything not matched to an integer kernel
counts as float.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any, Sequence

from ..errors import UnsupportedModelError

__all__ = ["INTEGER_KERNELS", "integer_macs"]

INTEGER_KERNELS = frozenset({"QLinearConv", "ConvInteger", "QGemm", "QLinearMatMul", "MatMulInteger",
                             "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention"})
_MAC_OPS = ("Conv", "Gemm", "MatMul")
_PASS_THROUGH = ("DequantizeLinear", "Transpose", "Reshape", "Identity", "Cast")


def _weight_source(name: str, producers: dict[str, Any], initializers: set[str]) -> str | None:
    """The constant (initializer or ``Constant`` output) a tensor is read from through dequantization and
    layout ops, if any."""
    for _ in range(8):
        if name in initializers:
            return name
        node = producers.get(name)
        if node is not None and node.op_type == "Constant":
            return name
        if node is None or node.op_type not in _PASS_THROUGH or not node.input:
            return None
        name = node.input[0]
    return None


def _constants(graph: Any) -> dict[str, Any]:
    """Every constant tensor of a graph by name: initializers and ``Constant`` outputs."""
    from onnx import numpy_helper  # why: an optional extra ('hub-dfq[onnx]'), checked by the caller

    values = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = node.attribute[0].t
    return {name: numpy_helper.to_array(t) for name, t in values.items()}


def _content_key(array: Any) -> tuple:
    """The same for a weight and its transposed or zero-point-shifted copies (ONNX Runtime makes both)."""
    import numpy as np  # why: onnx's dependency, only loaded with it

    values = np.sort(array.astype(np.int32).ravel())
    return tuple(sorted(array.shape)), hashlib.sha1((values - values[0]).tobytes()).hexdigest() if values.size else ""


def _runtime_shapes(model: Any, names: list[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of ``names`` in one run of ``model`` on a zero image (no graph optimisation, batch 1)."""
    import numpy as np  # why: onnx's dependency, only loaded with it
    import onnx  # why: an optional extra ('hub-dfq[onnx]'), checked by the caller

    from .onnx import _require_onnxruntime

    ort = _require_onnxruntime()
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names) if n not in known)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {}
    for value in session.get_inputs():
        dims = [d if isinstance(d, int) else None for d in value.shape]
        if None in dims[1:]:
            raise UnsupportedModelError(f"input {value.name} has dynamic dimensions {value.shape}: MACs need fixed "
                                        "image sizes")
        feeds[value.name] = np.zeros([1, *dims[1:]], dtype=np.float32)
    outputs = session.run(None, feeds)
    return {o.name: tuple(v.shape) for o, v in zip(session.get_outputs(), outputs)}


def _layer_macs(model: Any) -> list[dict[str, Any]]:
    """``[{"node", "op", "macs", "weight", "output"}]`` for the MAC-carrying nodes of an exported graph."""
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    nodes = [n for n in graph.node if n.op_type in _MAC_OPS]
    shapes = _runtime_shapes(model, [name for n in nodes for name in (n.input[0], n.input[1], n.output[0])])
    rows = []
    for node in nodes:
        out, first, second = (shapes[node.output[0]], shapes[node.input[0]], shapes[node.input[1]])
        if node.op_type == "Conv":  # every output value sums C_in/groups x kernel products
            per_output = math.prod(second[1:])
        else:  # Gemm / MatMul: every output value sums K products
            trans_a = any(a.name == "transA" and a.i for a in node.attribute)
            per_output = first[-2] if trans_a else first[-1]
        rows.append({"node": node.name, "op": node.op_type, "macs": int(per_output * math.prod(out)),
                     "weight": _weight_source(node.input[1], producers, initializers), "output": node.output[0]})
    return rows


def integer_macs(path: str | os.PathLike[str], *, threads: int | None = 1,
                 disabled_optimizers: Sequence[str] = ()) -> dict[str, Any]:
    """MACs per image of an exported model and the share ONNX Runtime runs in integer kernels.

    Args:
        path: an ``.onnx`` file (from :func:`hub_dfq.export_onnx`, or any model with fixed image sizes).
        threads: intra-op threads of the session that optimises the graph.
        disabled_optimizers: ONNX Runtime graph optimisers to leave out, as in :func:`hub_dfq.load_onnx`.

    Returns:
        ``total`` and ``integer`` MACs per image, ``share`` (integer / total) and ``float_layers``:
        ``[(node, op, macs)]`` of the MAC-carrying nodes left in float, largest first.

    Raises:
        DependencyError: onnx or onnxruntime is not installed.
        UnsupportedModelError: the model's image size is not fixed.
    """
    import onnx  # why: an optional extra ('hub-dfq[onnx]')

    from .onnx import _require_onnxruntime, optimized_graph

    _require_onnxruntime()
    model = onnx.load(str(path))
    layers = _layer_macs(model)
    exported = _constants(model.graph)
    optimized = optimized_graph(path, threads=threads, disabled_optimizers=disabled_optimizers)
    optimized_constants = _constants(optimized)
    integer_inputs: set[str] = set()
    integer_outputs: set[str] = set()
    integer_weights: set[tuple] = set()
    for node in optimized.node:
        if node.op_type in INTEGER_KERNELS:
            integer_inputs.update(node.input)
            integer_outputs.update(node.output)
            for name in node.input:
                array = optimized_constants.get(name)
                if array is not None and array.ndim >= 2:
                    integer_weights.add(_content_key(array))
    total = integer = 0
    float_layers = []
    for row in layers:
        total += row["macs"]
        weight = row["weight"]
        if weight is None:  # a product of two activations: the kernel that writes its output says
            runs_integer = row["output"] in integer_outputs
        else:  # by name, or by content where ONNX Runtime transposed or shifted the weight into a new one
            runs_integer = weight in integer_inputs or _content_key(exported[weight]) in integer_weights
        if runs_integer:
            integer += row["macs"]
        else:
            float_layers.append((row["node"], row["op"], row["macs"]))
    float_layers.sort(key=lambda item: -item[2])
    return {"total": total, "integer": integer, "share": integer / total if total else 0.0,
            "float_layers": float_layers}
