"""Model adapters: which library reads a model folder, decided from its ``config.json``.

An adapter turns a folder (a Hub repo snapshot or a local save) into a :class:`VisionModel`. A new
model family from another library is one module with a loader plus one :func:`register_adapter`
call. Adapters are tried by ``priority``, then in registration order (:func:`detection_order`); the
first whose ``detect`` accepts the config wins. The hub layer registers the ``hub_dfq`` adapter for
quantized checkpoints (:mod:`hub_dfq.hub.adapter`): this layer never imports that one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..registry import Registry

__all__ = ["ModelAdapter", "ADAPTERS", "register_adapter", "detection_order"]


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
    """

    name: str
    summary: str
    detect: Callable[[dict[str, Any]], bool]
    load: Callable[..., Any] | str
    builds_architecture: bool = True
    priority: int = 0


ADAPTERS: Registry[ModelAdapter] = Registry("model adapter", "adapter")


def register_adapter(adapter: ModelAdapter, *, overwrite: bool = False) -> ModelAdapter:
    """Add a model adapter (see :class:`ModelAdapter`)."""
    return ADAPTERS.register(adapter, overwrite=overwrite)


def detection_order() -> list[ModelAdapter]:
    """The adapters in the order they see a folder's config: higher ``priority`` first, then registration order."""
    return sorted(ADAPTERS, key=lambda adapter: -adapter.priority)


register_adapter(ModelAdapter(
    "timm", "a timm model folder (config.json with 'architecture') or a timm registry name",
    detect=lambda config: "architecture" in config and "model_type" not in config,
    load="hub_dfq.models.timm_adapter:load_timm_folder"))
register_adapter(ModelAdapter(
    "transformers", "a transformers image classifier (config.json with 'model_type')",
    detect=lambda config: "model_type" in config,
    load="hub_dfq.models.transformers_adapter:load_transformers_folder"))
