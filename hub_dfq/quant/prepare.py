"""Turn a float model into a quantization-ready graph: trace, fold BN, swap layers, place quantizers.

The model is traced with ``torch.fx`` so that every place where an integer graph quantizes a tensor
is explicit: the input of every conv/linear and both operands of every residual addition.
Quantizers are shared where several layers read the same tensor at the same bit width inside one
block. Layers with parameters that have no quantized counterpart are reported by name and left in
full precision, never silently.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import operator
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import ConfigError, UnsupportedModelError
from ..models.adapters import TracingHints, tracing_hints
from ..models.vision_model import BN_TYPES
from .config import GRAPH_VERSION, QuantConfig
from .float_parts import float_parts
from .fold import CONV_TYPES, fold_batchnorms
from .modules import QuantModule, qmodule_for
from .padding import expand_same_padding, zero_pad_input
from .placement import PlacementRules
from .quantizers import ActQuantizer
from .tracing import ConcreteTracer

logger = logging.getLogger(__name__)

__all__ = ["ActPoint", "PrepareReport", "Prepared", "prepare", "block_paths", "ACT_QUANTIZERS"]

ACT_QUANTIZERS = "act_quantizers"  # the container module holding every activation quantizer
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_RELU_MODULES = (nn.ReLU, nn.ReLU6)
# Ops that move or select values without computing new ones: a quantized tensor stays on its grid.
_IDENTITY_MODULES = (nn.Identity, nn.Dropout)
_KEEP_SIGN_FUNCTIONS = (operator.getitem, torch.flatten, torch.reshape, F.pad, F.max_pool2d, F.adaptive_max_pool2d,
                        F.avg_pool2d, F.adaptive_avg_pool2d, torch.mean, F.dropout)
_KEEP_SIGN_METHODS = ("view", "reshape", "flatten", "contiguous", "permute", "transpose", "squeeze", "unsqueeze",
                      "mean", "__getitem__")
_KEEP_SIGN_MODULES = (nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                      nn.AdaptiveMaxPool2d, nn.Flatten)


@dataclass
class ActPoint:
    """One activation quantizer: where it sits and what it reads.

    Args:
        name: its module name under ``act_quantizers``.
        source: the graph node whose output it quantizes.
        consumers: qualified names of the layers (or ``BLOCK.add`` nodes) reading its output.
        kind: ``"input"`` (of a conv/linear), ``"residual"`` (operand of an addition) or ``"output"``
            (of a conv/linear layer whose output a float op reads before any quantizer; graph version 2).
        bits: bit width.
        signed: asymmetric with a zero point (``False``: unsigned after a ReLU).
        block: the block it belongs to (for block-wise reconstruction).
    """

    name: str
    source: str
    consumers: list[str]
    kind: str
    bits: int
    signed: bool
    block: str


@dataclass
class PrepareReport:
    """What was quantized, folded, excluded and left in float (and why).

    ``unsupported`` names layers with weights that an integer model would quantize but this one cannot
    (a conv subclass with its own forward, a module called twice, a weight used by a functional op);
    ``float_by_design`` what integer runtimes compute in float too (normalisations over a tensor's own
    statistics, a BatchNorm with no convolution to fold into, learned tensors that are added or
    multiplied: position embeddings, class tokens, layer scales).

    ``same_padding`` lists the "same"-padding convolutions rewritten as static pads (graph version 2),
    ``absorbed_pads`` the zero pads each quantized convolution does itself (``F.pad`` order).
    """

    quantized: dict[str, dict[str, Any]] = field(default_factory=dict)
    folded_bn: list[str] = field(default_factory=list)
    unfolded_bn: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    float_by_design: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    same_padding: list[str] = field(default_factory=list)
    absorbed_pads: dict[str, list[int]] = field(default_factory=dict)
    residual_adds: list[str] = field(default_factory=list)
    act_points: list[ActPoint] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["act_points"] = [asdict(p) for p in self.act_points]
        return data


@dataclass
class Prepared:
    """A prepared graph: the module, its report and the block each node belongs to."""

    module: fx.GraphModule
    report: PrepareReport
    node_blocks: dict[str, str]


class _Tracer(fx.Tracer):
    """Keeps BN, registered weight layers and the model family's untraceable parts (``hints``) as leaves."""

    def __init__(self, graph_version: int = GRAPH_VERSION, hints: TracingHints | None = None) -> None:
        self.graph_version = graph_version
        hints = hints if hints is not None else TracingHints()
        self._notrace_modules: tuple = tuple(hints.leaf_modules)
        super().__init__(autowrap_functions=tuple(hints.leaf_functions))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, BN_TYPES) or qmodule_for(m, graph_version=self.graph_version) is not None \
                or isinstance(m, QuantModule):
            return True
        if self._notrace_modules and isinstance(m, self._notrace_modules):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def block_paths(module: nn.Module) -> set[str]:
    """Qualified names of the blocks: children of the root and of containers that are not containers."""
    paths: set[str] = set()

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in parent.named_children():
            path = prefix + name
            if isinstance(child, _CONTAINERS):
                visit(child, path + ".")
            else:
                paths.add(path)

    visit(module, "")
    return paths


class _ConcreteTracer(ConcreteTracer, _Tracer):
    """The same leaf rules, answering shape questions with concrete values (transformers models)."""


def _trace(module: nn.Module, example_input: torch.Tensor, graph_version: int = GRAPH_VERSION,
           hints: TracingHints | None = None) -> fx.GraphModule:
    try:
        tracer: fx.Tracer = _Tracer(graph_version, hints)
        graph = tracer.trace(module)
    except Exception as symbolic_error:  # noqa: BLE001 - fx raises many types on Python control flow
        # Retry knowing concrete shapes (models that branch on sizes, e.g. transformers), and say so.
        logger.info("symbolic tracing of %s failed (%s: %s); tracing with concrete shapes", type(module).__name__,
                    type(symbolic_error).__name__, symbolic_error)
        # a batch of 2: the concrete tracer keeps a batch-sized first dimension symbolic (see .tracing)
        batch = torch.cat([example_input[:1]] * 2) if example_input.dim() else example_input
        tracer = _ConcreteTracer(example_inputs=(batch,), graph_version=graph_version, hints=hints)
        try:
            graph = tracer.trace(module)
        except Exception as err:  # noqa: BLE001 - reported below with both failures
            raise UnsupportedModelError(
                f"cannot trace {type(module).__name__} with torch.fx (symbolic: {type(symbolic_error).__name__}: "
                f"{symbolic_error}; with concrete shapes: {type(err).__name__}: {err}); quantization needs a static "
                "graph to place the integer quantizers: use a model without data-dependent control flow, or keep "
                "the offending module in float with `exclude`") from err
    _bind_defaults(graph)
    return fx.GraphModule(tracer.root, graph, type(module).__name__)


def _bind_defaults(graph: fx.Graph) -> None:
    """Make every input after the image its default value (timm ViTs take ``attn_mask=None, is_causal=False``):
    the quantized model is a function of the image alone, and exporters must not see them as tensors."""
    for node in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        if len(node.args) != 1:  # no default: leave it, the caller must pass it
            continue
        def bound(a, n=node, default=node.args[0]):
            return default if a is n else a

        for user in list(node.users):
            user.args = fx.node.map_aggregate(user.args, bound)
            user.kwargs = fx.node.map_aggregate(user.kwargs, bound)
        graph.erase_node(node)


def _node_block(node: fx.Node, blocks: set[str]) -> str | None:
    if "hub_dfq_block" in node.meta:
        return node.meta["hub_dfq_block"]
    for path in (node.meta.get("nn_module_stack") or {}):
        entry = node.meta["nn_module_stack"][path]
        qualname = entry[0] if isinstance(entry, tuple) else path
        if qualname in blocks:
            return qualname
    return None


def _is_tensor(node: Any) -> bool:
    return isinstance(node, fx.Node) and hasattr(node.meta.get("tensor_meta"), "shape")


def _strip_identity(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node:
    """Follow no-op nodes (Identity, Dropout in eval, contiguous) back to the tensor they forward."""
    while True:
        if node.op == "call_module" and isinstance(modules.get(node.target), _IDENTITY_MODULES):
            node = node.args[0]
        elif node.op == "call_function" and node.target is F.dropout:
            node = node.args[0]
        elif node.op == "call_method" and node.target == "contiguous":
            node = node.args[0]
        else:
            return node


def _value_producer(node: Any, modules: dict[str, nn.Module]) -> Any:
    """The node that computed ``node``'s values, found back through ops that only select, move or average
    them (reshapes, pools, dropout, zero padding): the sign and the largest value are that node's."""
    for _ in range(64):
        if not isinstance(node, fx.Node):
            return node
        args = [a for a in node.args if isinstance(a, fx.Node)]
        if node.op == "call_function":
            value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else 0)
            through = node.target in _KEEP_SIGN_FUNCTIONS and not (node.target is F.pad and value not in (0, 0.0, None))
        elif node.op == "call_method":
            through = node.target in _KEEP_SIGN_METHODS
        elif node.op == "call_module":
            through = isinstance(modules.get(node.target), _KEEP_SIGN_MODULES)
        else:
            through = False
        if not (through and args):
            return node
        node = args[0]
    return None


def _nonnegative(node: Any, modules: dict[str, nn.Module], depth: int = 0) -> bool:
    """Whether a node's output is >= 0 by construction (after a ReLU, through ops that keep the sign)."""
    node = _value_producer(node, modules)
    if not isinstance(node, fx.Node) or depth > 64:
        return False
    if node.op == "call_function":
        if node.target in (F.relu, torch.relu, F.relu6):
            return True
        args = [a for a in node.args if isinstance(a, fx.Node)]
        return node.target in _ADD_FUNCTIONS and len(args) == 2 and all(
            _nonnegative(a, modules, depth + 1) for a in args)
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    if node.op == "call_module":
        module = modules.get(node.target)
        last = module[-1] if isinstance(module, nn.Sequential) and len(module) else module
        return isinstance(last, _RELU_MODULES)
    return False


def _upper_bound(node: Any, modules: dict[str, nn.Module], depth: int = 0) -> float | None:
    """The largest value a node's output can take by construction (after a ReLU6 or a Hardtanh), if any."""
    node = _value_producer(node, modules)
    if not isinstance(node, fx.Node) or depth > 64:
        return None
    if node.op == "call_function":
        if node.target is F.relu6:
            return 6.0
        if node.target is F.hardtanh:
            return float(node.kwargs.get("max_val", node.args[2] if len(node.args) > 2 else 1.0))
        return None
    if node.op == "call_module":
        if _is_quantizer(node):  # its grid is kept inside the bound (calibrated on, or projected to, it)
            return _upper_bound(node.args[0], modules, depth + 1)
        module = modules.get(node.target)
        last = module[-1] if isinstance(module, nn.Sequential) and len(module) else module
        if isinstance(last, nn.Hardtanh):  # nn.ReLU6 is a Hardtanh(0, 6)
            return float(last.max_val)
    return None


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return True
    return node.op == "call_method" and node.target in ("add", "add_")


def _absorbable_pad(node: fx.Node, layer: nn.Module, modules: dict[str, nn.Module]):
    """``(unpadded input, pads)`` when ``node`` convolves a zero pad of its input it can do itself, else ``None``."""
    if not isinstance(layer, CONV_TYPES) or layer.padding_mode != "zeros" or not node.args:
        return None
    return zero_pad_input(node.args[0], modules, layer.weight.dim() - 2)


# The spellings of each activation PlacementRules may name (module types, functions, tensor methods), and of
# the no-ops every kernel passes through.
_ACTIVATION_FORMS: dict[str, tuple[tuple[type, ...], tuple[Any, ...], tuple[str, ...]]] = {
    "relu": ((nn.ReLU,), (F.relu, torch.relu), ("relu",)),
    "relu6": ((nn.ReLU6,), (F.relu6,), ()),
    "hardtanh": ((nn.Hardtanh,), (F.hardtanh,), ()),
    "silu": ((nn.SiLU,), (F.silu,), ()),
    "hardswish": ((nn.Hardswish,), (F.hardswish,), ()),
    "sigmoid": ((nn.Sigmoid,), (torch.sigmoid, F.sigmoid), ("sigmoid",)),
    "gelu": ((nn.GELU,), (F.gelu,), ()),
}
_NO_OP_FORMS = ((nn.Identity, nn.Dropout), (F.dropout,), ("contiguous",))


def _fusable_forms(rules: PlacementRules) -> tuple[tuple[type, ...], tuple[Any, ...], tuple[str, ...]]:
    """``(module types, functions, methods)`` an integer kernel applies on its way to its output quantizer."""
    forms = [_ACTIVATION_FORMS[name] for name in rules.fused_activations] + [_NO_OP_FORMS]
    return tuple(tuple(x for f in forms for x in f[i]) for i in range(3))


def _is_quantizer(node: fx.Node) -> bool:
    return node.op == "call_module" and str(node.target).startswith(ACT_QUANTIZERS + ".")


def _fused_output(node: fx.Node, modules: dict[str, nn.Module], rules: PlacementRules) -> fx.Node:
    """The tensor an integer kernel for ``node`` would produce: its output through the single-use activations
    ``rules`` fuse, and no-ops."""
    fusable_modules, fusable_functions, fusable_methods = _fusable_forms(rules)
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op == "call_module":
            module = modules.get(user.target)
            parts = list(module) if isinstance(module, nn.Sequential) else [module]
            fusable = all(isinstance(m, fusable_modules) for m in parts)
        elif user.op == "call_function":
            fusable = user.target in fusable_functions
        else:
            fusable = user.op == "call_method" and user.target in fusable_methods
        if not fusable or user.args[0] is not node:
            break
        node = user
    return node


def _new_quantizer(gm: fx.GraphModule, container: nn.Module, qname: str, source: fx.Node, scheme, bits: int,
                   signed: bool, block: str, kind: str, shared: dict, key: tuple) -> tuple[fx.Node, ActPoint]:
    """An activation quantizer of ``source`` as a graph node (at the caller's insertion point), shared by key."""
    quantizer = ActQuantizer(bits, signed=signed)
    quantizer.observer_method, quantizer.percentile = scheme.act_observer, scheme.percentile
    container.add_module(qname, quantizer)
    qnode = gm.graph.call_module(f"{ACT_QUANTIZERS}.{qname}", (source,))
    qnode.meta["hub_dfq_block"] = block
    qnode.meta["tensor_meta"] = source.meta.get("tensor_meta")
    point = ActPoint(qname, source.name, [], kind, bits, signed, block)
    shared[key] = (qnode, point, quantizer)
    return qnode, point


def _add_output_point(gm: fx.GraphModule, conv: fx.Node, modules: dict[str, nn.Module], config: QuantConfig,
                      container: nn.Module, shared: dict, report: PrepareReport, blocks: set[str]) -> None:
    """Quantize a layer's (activated) output where the backend (``config.placement``) would otherwise run it in float.

    Under rules with ``output_quantizers`` (ONNX Runtime's), ``DequantizeLinear -> Conv -> QuantizeLinear`` is
    an integer kernel, but a conv whose output goes to a SiLU, a normalisation or a pooling first runs as a
    float ``Conv``. A linear layer whose output no quantizer reads still runs integer (``MatMulIntegerToFloat``,
    ``QGemm`` with float output), but not one read by a quantizer *and* a float op (a residual stream that also
    feeds a LayerNorm). A quantizer on the output, at the residual width (8 bits by default, what the integer
    kernel writes), after the activations the kernel fuses, makes both integer.
    """
    end = _fused_output(conv, modules, config.placement)
    users = list(end.users)
    quantized = [_is_quantizer(u) for u in users]
    if not users or all(quantized) or any(u.op == "output" for u in users):
        return
    if not isinstance(modules[conv.target], CONV_TYPES) and not any(quantized):
        return
    name = conv.target
    scheme = config.residual_scheme(name)
    if not scheme.enabled:
        return
    block = _node_block(conv, blocks) or ""
    signed = not _nonnegative(end, modules)
    key = (end.name, scheme.activations, signed, block)
    if key in shared:  # a quantizer of this tensor already exists: everything reads through it
        qnode, point, _ = shared[key]
        end.append(qnode)  # right after the tensor, before any reader (it reads nothing else)
    else:
        qname = _sanitize(name) + "_out"
        with gm.graph.inserting_after(end):
            qnode, point = _new_quantizer(gm, container, qname, end, scheme, scheme.activations, signed, block,
                                          "output", shared, key)
        report.act_points.append(point)
    for user in users:
        if user is not qnode:
            user.replace_input_with(end, qnode)
            point.consumers.append(user.target if user.op == "call_module" else user.name)


def _sanitize(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", name)


def check_recipe(config: QuantConfig, report: PrepareReport, layers: list[str]) -> None:
    """Refuse a recipe that does nothing the user asked for: an override whose glob matches no layer (a typo
    would be ignored silently), or excludes that leave no layer quantized (the "quantized" checkpoint would be
    the float model under a W/A tag). An exclude glob that matches nothing is only warned about.

    Raises:
        ConfigError: saying which glob, with examples of the model's layer names.
    """
    names = list(dict.fromkeys([*layers, *report.residual_adds, *report.excluded]))
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    for pattern, _ in config.overrides:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ConfigError(f"the `overrides` glob {pattern!r} matches no layer of the model (its layers are named "
                              f"like {shown}): fix the glob, or drop it")
    for pattern in config.exclude:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            logger.warning("the exclude glob %r matches no layer of the model (its layers are named like %s)",
                           pattern, shown)
    if not report.quantized:
        raise ConfigError(f"nothing is left to quantize: `exclude` {list(config.exclude)} (with the overrides and "
                          f"includes) keeps all {len(layers)} convolution and linear layers in full precision, so "
                          "the checkpoint would be the float model: exclude fewer layers")


def prepare(module: nn.Module, config: QuantConfig, *, example_input: torch.Tensor, strict: bool = True,
            hints: TracingHints | None = None) -> Prepared:
    """Trace a copy of ``module`` and make it a quantized graph (quantizers not yet calibrated).

    Args:
        module: the float model (not modified).
        config: which layers get which scheme.
        example_input: one input batch, used to tell tensors from other values in the graph.
        strict: refuse a recipe that matches nothing (see :func:`check_recipe`); off when a saved checkpoint is
            rebuilt (its recipe was accepted when it was made).
        hints: what ``torch.fx`` keeps whole, from the model's family (``VisionModel.tracing_hints``); by default
            every registered family's hints (a bare module of unknown origin).

    Returns:
        A :class:`Prepared` graph, its report and the block of every node.

    Raises:
        UnsupportedModelError: the model cannot be traced or has no conv/linear layer to quantize.
        ConfigError: (``strict``) an override that matches no layer, or nothing left to quantize.
    """
    float_module = copy.deepcopy(module).eval()
    blocks = block_paths(float_module)
    graph_version = config.graph_version
    hints = hints if hints is not None else tracing_hints()
    gm = _trace(float_module, example_input, graph_version, hints)
    report = PrepareReport()
    if graph_version >= 2:  # static "same" pads need the traced shapes
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
        report.same_padding = expand_same_padding(gm, hints.same_padded)
    report.folded_bn, report.unfolded_bn = fold_batchnorms(gm)
    with torch.no_grad():
        ShapeProp(gm).propagate(example_input)
    modules = dict(gm.named_modules())

    # ---- swap weight layers ------------------------------------------------------------------
    weight_nodes = [n for n in gm.graph.nodes if n.op == "call_module"
                    and qmodule_for(modules[n.target], graph_version=graph_version) is not None]
    if not weight_nodes:
        raise UnsupportedModelError(
            f"{type(module).__name__} has no convolution or linear layer to quantize (found "
            f"{sorted({type(m).__name__ for m in modules.values() if list(m.parameters(recurse=False))})})")
    first, last = weight_nodes[0].target, weight_nodes[-1].target
    swapped: dict[str, fx.Node] = {}
    for node in weight_nodes:
        name, float_layer = node.target, modules[node.target]
        scheme = config.scheme_for(name, first=name == first, last=name == last)
        if not config.selected(name) or not scheme.enabled:
            report.excluded.append(name)
            continue
        if name in swapped:  # one module called twice: its input scales could differ, keep it float
            report.unsupported.append(f"{name} ({type(float_layer).__name__}, called more than once)")
            continue
        qclass = qmodule_for(float_layer, graph_version=graph_version)
        pad = _absorbable_pad(node, float_layer, modules) if graph_version >= 2 else None
        if pad is not None:
            qlayer = qclass.from_float(float_layer, scheme, pre_pad=pad[1])
            node.replace_input_with(node.args[0], pad[0])
            report.absorbed_pads[name] = list(pad[1])
        else:
            qlayer = qclass.from_float(float_layer, scheme)
        gm.set_submodule(name, qlayer)
        swapped[name] = node
        report.quantized[name] = {"type": type(float_layer).__name__, "weights": scheme.weights,
                                  "activations": scheme.activations, "first": name == first, "last": name == last}
    modules = dict(gm.named_modules())
    unsupported, by_design = float_parts(gm, dict(float_module.named_modules()), skip=set(report.excluded),
                                         unfolded_bn=report.unfolded_bn)
    report.unsupported += unsupported
    report.float_by_design += by_design

    # ---- place activation quantizers ---------------------------------------------------------
    container = nn.Module()
    gm.add_module(ACT_QUANTIZERS, container)
    shared: dict[tuple, tuple[fx.Node, ActPoint, ActQuantizer]] = {}
    node_blocks: dict[str, str] = {}

    def add_point(consumer: fx.Node, arg: fx.Node, scheme, kind: str, consumer_name: str, suffix: str):
        bits = scheme.activations
        block = _node_block(consumer, blocks) or ""
        source = _strip_identity(arg, modules)
        signed = not _nonnegative(source, modules)
        key = (source.name, bits, signed, block)
        if key in shared:
            qnode, point, quantizer = shared[key]
            point.consumers.append(consumer_name)
        else:
            with gm.graph.inserting_before(consumer):
                qnode, point = _new_quantizer(gm, container, _sanitize(consumer_name) + suffix, source, scheme, bits,
                                              signed, block, kind, shared, key)
            point.consumers.append(consumer_name)
            quantizer = shared[key][2]
            report.act_points.append(point)
        consumer.replace_input_with(arg, qnode)
        return quantizer

    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(modules.get(node.target), QuantModule):
            layer = modules[node.target]
            if node.args and isinstance(node.args[0], fx.Node):
                layer.set_input_quantizer(add_point(node, node.args[0], layer.scheme, "input", node.target, "_in"))
        elif _is_add(node):
            operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
            if len(operands) != 2 or not all(_is_tensor(a) for a in operands):
                continue
            block = _node_block(node, blocks)
            name = f"{block}.{node.name}" if block else node.name
            scheme = config.residual_scheme(name)
            if not config.selected(name) or not scheme.enabled:
                report.excluded.append(name)
                continue
            report.residual_adds.append(name)
            for i, operand in enumerate(operands):
                add_point(node, operand, scheme, "residual", name, f"_in{i}")
    if graph_version >= 2 and config.output_quantizers and config.placement.output_quantizers:
        gm.graph.eliminate_dead_code()  # bypassed no-ops (Identity, Dropout) are not readers
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and isinstance(modules.get(node.target), QuantModule):
                _add_output_point(gm, node, modules, config, container, shared, report, blocks)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if _is_quantizer(node):
            modules[node.target].upper_bound = _upper_bound(node.args[0], modules)
    # why: the quantizers made above start on the CPU, the traced layers sit where the model does (a GPU)
    device = next((p.device for p in module.parameters()), None)
    if device is not None:
        gm.to(device)
    for node in gm.graph.nodes:
        block = _node_block(node, blocks)
        if block is not None:
            node_blocks[node.name] = block
    if strict:
        check_recipe(config, report, [n.target for n in weight_nodes])
    if report.unsupported:
        logger.warning("left in full precision (no integer equivalent): %s", "; ".join(report.unsupported))
    if report.float_by_design:
        logger.info("in float by design: %s", "; ".join(report.float_by_design))
    return Prepared(gm, report, node_blocks)
