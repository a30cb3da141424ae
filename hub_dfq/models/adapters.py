"""Model adapters: which library reads a model folder, decided from its ``config.json``.

An adapter turns a folder (a Hub repo snapshot or a local save) into a :class:`VisionModel`. A new
model family from another library is one module with a loader plus one :func:`register_adapter`
call. Adapters are tried by ``priority``, then in registration order (:func:`detection_order`); the
first whose ``detect`` accepts the config wins. The hub layer registers the ``hub_dfq`` adapter for
quantized checkpoints (:mod:`hub_dfq.hub.adapter`): this layer never imports that one.

A family's quantization quirks travel with its adapter as data: :class:`TracingHints` (the layers and
functions ``torch.fx`` must keep whole) is what the quantization core reads, from the model it is given
(:attr:`VisionModel.tracing_hints <hub_dfq.models.vision_model.VisionModel.tracing_hints>`), so the core
names no model library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..registry import Registry, resolve

__all__ = ["ModelAdapter", "ADAPTERS", "register_adapter", "detection_order", "TracingHints", "tracing_hints"]


@dataclass(frozen=True)
class TracingHints:
    """What ``torch.fx`` must keep whole when it traces a model of one family (its untraceable parts).

    Args:
        leaf_modules: module classes traced as one call, not through (timm's ``get_notrace_modules()``).
        leaf_functions: functions recorded as one call (timm's ``get_notrace_functions()``).
        same_padded: layer classes that pad their own input TensorFlow-"same" at every call (timm's
            ``Conv2dSame``): the quantized graph and the synthesis loop make those pads static
            (:mod:`hub_dfq.models.same_padding`).
    """

    leaf_modules: tuple[type, ...] = ()
    leaf_functions: tuple[Callable[..., Any], ...] = ()
    same_padded: tuple[type, ...] = ()

    def __or__(self, other: "TracingHints") -> "TracingHints":
        return TracingHints(tuple(dict.fromkeys(self.leaf_modules + other.leaf_modules)),
                            tuple(dict.fromkeys(self.leaf_functions + other.leaf_functions)),
                            tuple(dict.fromkeys(self.same_padded + other.same_padded)))


@dataclass(frozen=True)
class ModelAdapter:
    """How to load one kind of model folder.

    Args:
        name: the library (``"timm"``, ``"transformers"``) or format (``"hub_dfq"``).
        summary: one line for listings.
        detect: ``config -> bool``: whether this adapter reads a folder with that ``config.json``.
        load: ``(folder, source, *, trust_remote_code, pretrained) -> VisionModel``, or its
            ``"module:attribute"`` path.
        builds_architecture: it can also build the bare architecture (``pretrained=False``), which
            quantized checkpoints use to rebuild their float graph.
        priority: adapters with a higher one see a config first. A format on top of another adapter's
            folders needs it: a quantized checkpoint keeps its base model's ``config.json``, which the
            timm or transformers adapter would otherwise claim.
        tracing: ``() -> TracingHints`` for this family's models, or its ``"module:attribute"`` path (read
            when a model is prepared for quantization, so it may import the library).
    """

    name: str
    summary: str
    detect: Callable[[dict[str, Any]], bool]
    load: Callable[..., Any] | str
    builds_architecture: bool = True
    priority: int = 0
    tracing: Callable[[], TracingHints] | str | None = None


ADAPTERS: Registry[ModelAdapter] = Registry("model adapter", "adapter")


def register_adapter(adapter: ModelAdapter, *, overwrite: bool = False) -> ModelAdapter:
    """Add a model adapter (see :class:`ModelAdapter`)."""
    return ADAPTERS.register(adapter, overwrite=overwrite)


def detection_order() -> list[ModelAdapter]:
    """The adapters in the order they see a folder's config: higher ``priority`` first, then registration order."""
    return sorted(ADAPTERS, key=lambda adapter: -adapter.priority)


def tracing_hints(library: str | None = None) -> TracingHints:
    """The tracing hints of the adapter named ``library``; for a model of no known family (``None``, or a
    name no adapter has), those of every adapter together, so a bare module traces as it would in any family."""
    if library in ADAPTERS:
        adapter = ADAPTERS.get(library)
        return resolve(adapter.tracing)() if adapter.tracing is not None else TracingHints()
    hints = TracingHints()
    for adapter in ADAPTERS:
        if adapter.tracing is not None:
            try:
                hints = hints | resolve(adapter.tracing)()
            except ImportError:  # pragma: no cover - a family whose library is missing has no models to trace
                continue
    return hints


register_adapter(ModelAdapter(
    "timm", "a timm model folder (config.json with 'architecture') or a timm registry name",
    detect=lambda config: "architecture" in config and "model_type" not in config,
    load="hub_dfq.models.timm_adapter:load_timm_folder", tracing="hub_dfq.models.timm_adapter:timm_tracing_hints"))
register_adapter(ModelAdapter(
    "transformers", "a transformers image classifier (config.json with 'model_type')",
    detect=lambda config: "model_type" in config,
    load="hub_dfq.models.transformers_adapter:load_transformers_folder"))
