"""A torch.fx tracer that knows concrete values, for models whose forward inspects shapes.

Many transformers vision models check ``pixel_values.shape[1]`` against the config or branch on
sizes in Python; plain symbolic tracing fails on those branches. This tracer runs every traced
operation on the example input as it records it, so ``.shape``, ``.size()``, ``.dim()`` and
``bool(...)`` of a traced value are answered with the concrete result. The graph is then specialised
to the example's shape, which is what a fixed-input classifier needs, except the batch size: dimension
0 of a tensor as large as the example's batch is traced as ``size(0)`` (so trace with a batch of 2+).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx, nn

logger = logging.getLogger(__name__)

__all__ = ["ConcreteTracer"]

_MISSING = object()


class ConcreteProxy(fx.Proxy):
    """A proxy that answers shape questions from the value the tracer computed for its node."""

    def _value(self) -> Any:
        return self.tracer.values.get(self.node, _MISSING)

    def __getattr__(self, name: str) -> Any:
        value = self._value()
        if value is not _MISSING and isinstance(value, torch.Tensor):
            if name == "shape":
                return self._shape(value)
            if name == "size":
                return lambda dim=None: self._shape(value) if dim is None else self._shape(value)[dim]
            if name in ("ndim", "dtype", "device", "is_floating_point", "dim", "numel"):
                return getattr(value, name)
        return super().__getattr__(name)

    def _shape(self, value: torch.Tensor) -> tuple[Any, ...]:
        """The concrete shape, except a first dimension that is a multiple of the batch size, which stays
        a traced ``size(0)``.

        Without it, code like ``cls_token.expand(pixel_values.shape[0], -1, -1)`` would be recorded with
        the example's batch size and fail on any other; multiples cover tensors that fold the batch into
        their first dimension (Swin's windows: batch x windows). A traced ``size(0)`` of a tensor whose
        first dimension is not batch-derived is still right, only less static.
        """
        shape = tuple(value.shape)
        batch = self.tracer.batch_size
        if shape and batch and shape[0] and shape[0] % batch == 0:
            return (self.tracer.create_proxy("call_method", "size", (self, 0), {}), *shape[1:])
        return shape

    def __int__(self) -> int:
        return self.__index__()

    def __bool__(self) -> bool:
        value = self._value()
        if value is not _MISSING:
            return bool(value)
        return super().__bool__()

    def __len__(self) -> int:
        value = self._value()
        if value is not _MISSING:
            return len(value)
        return super().__len__()

    def __index__(self) -> int:
        value = self._value()
        if value is not _MISSING:
            return int(value)
        raise TypeError("cannot use a traced value as an index")


class ConcreteTracer(fx.Tracer):
    """Mixin-style tracer: combine with a tracer's leaf rules via multiple inheritance."""

    def __init__(self, *args: Any, example_inputs: tuple[Any, ...] = (), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.example_inputs = list(example_inputs)
        first = self.example_inputs[0] if self.example_inputs else None
        # dimension 0 of this size is traced symbolically; 1 would catch every singleton dimension
        batched = isinstance(first, torch.Tensor) and first.dim() and first.shape[0] > 1
        self.batch_size = first.shape[0] if batched else None
        self.values: dict[fx.Node, Any] = {}
        self._placeholders = 0
        self._computing = False

    # While a concrete value is computed, fx's global patches of Module.__call__ and attribute access
    # must act like plain PyTorch, or the computation itself would be recorded in the graph.
    def call_module(self, m: nn.Module, forward, args, kwargs):
        if self._computing:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]):
        if self._computing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ConcreteProxy(node, self)

    def _concrete(self, value: Any) -> Any:
        return fx.node.map_aggregate(
            value, lambda v: self.values.get(v.node, _MISSING) if isinstance(v, fx.Proxy) else v)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        self._computing = True
        try:
            value = self._compute(kind, target, args, kwargs)
        except Exception as err:  # noqa: BLE001 - an op we cannot evaluate stays unknown; tracing goes on symbolically
            logger.debug("no concrete value for %s %s (%s: %s)", kind, target, type(err).__name__, err)
            value = _MISSING
        finally:
            self._computing = False
        if value is not _MISSING:
            self.values[proxy.node] = value
        return proxy

    @torch.no_grad()
    def _compute(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        if kind == "placeholder":
            index = self._placeholders
            self._placeholders += 1
            return self.example_inputs[index] if index < len(self.example_inputs) else _MISSING
        if kind == "get_attr":
            value: Any = self.root
            for part in str(target).split("."):
                value = getattr(value, part)
            return value
        args, kwargs = self._concrete(args), self._concrete(kwargs)
        if any(v is _MISSING for v in _flatten((args, kwargs))):
            return _MISSING
        if kind == "call_function":
            return target(*args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        if kind == "call_module":
            module: nn.Module = self.root.get_submodule(target)
            return module(*args, **kwargs)
        return _MISSING


def _flatten(value: Any) -> list[Any]:
    out: list[Any] = []
    fx.node.map_aggregate(value, out.append)
    return out
