"""The quantized checkpoint as a model format: ``load_model`` reads it through the ``hub_dfq`` adapter.

The format belongs to this layer and the adapters to the models layer below it, which must not import
this one; so this module registers the adapter, and the Hub package imports it when :mod:`hub_dfq.plugins`
imports that at ``import hub_dfq`` (before any model can load). It stays cheap to import: the loader is
named, and torch loads with it on first use.
"""

from __future__ import annotations

from typing import Any

from ..models.adapters import ModelAdapter, register_adapter

__all__ = ["QUANT_METHOD", "is_quantized_checkpoint", "QUANTIZED_ADAPTER"]

QUANT_METHOD = "hub_dfq"  # ``quantization_config.quant_method`` of a hub-dfq checkpoint


def is_quantized_checkpoint(config: dict[str, Any]) -> bool:
    """Whether a ``config.json`` is a hub-dfq quantized checkpoint's."""
    return (config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD


QUANTIZED_ADAPTER = register_adapter(ModelAdapter(
    "hub_dfq", "a hub-dfq quantized checkpoint (the integer model, rebuilt on its base architecture)",
    detect=is_quantized_checkpoint, load="hub_dfq.hub.checkpoint:load_quantized_folder", builds_architecture=False,
    priority=1))
