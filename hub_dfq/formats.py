"""Hub formats: how an object of a lower layer is saved, pushed and loaded, supplied by the layer that owns the format.

Users call ``q.save_pretrained(DIR)``, ``q.push_to_hub(REPO)`` and ``QuantizedModel.from_pretrained(SPEC)``
on what :func:`hub_dfq.quantize` returns, as on the models of every Hub library. What those verbs
write (integer safetensors, ``config.json``, the card, one-commit uploads) is the Hub layer's
(:mod:`hub_dfq.hub.checkpoint`), which builds on the quantization core; the core never imports that
layer (``tests/test_architecture.py``), and a lazy import or a ``"module:attribute"`` string in a method
would only hide the same upward edge.

The dependency is inverted through this registry, which sits below both:

- the object names its format (``QuantizedModel.hub_format = "quantized-model"``) and its methods call
  the verbs of the :class:`HubFormat` registered under that name;
- the Hub layer registers its formats in its package ``__init__`` (descriptors with lazy targets, so
  nothing heavy is imported until the first save);
- :mod:`hub_dfq.plugins` imports that package ``__init__`` when ``import hub_dfq`` runs, which Python
  does before any ``hub_dfq`` sub-module is imported: a ``QuantizedModel`` cannot exist before its
  format is registered, whether or not its user ever imported :mod:`hub_dfq.hub`.

The methods and the functions (:func:`hub_dfq.save_pretrained`, ...) are then one code path: the
format's targets are those functions. Other ways were weighed: huggingface_hub's ``ModelHubMixin``
(hooks on the class) would put the writer in the core; a wrapper returned by ``quantize`` would
make ``quant.api`` know the Hub layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .registry import Registry, resolve

__all__ = ["HubFormat", "HUB_FORMATS", "register_hub_format", "hub_verb"]


@dataclass(frozen=True)
class HubFormat:
    """How one kind of object becomes a Hub repo and comes back.

    Args:
        name: what the object's ``hub_format`` names.
        summary: one line on what the repo holds.
        save_pretrained: ``(obj, out_dir, **options) -> folder``, or its ``"module:attribute"`` path.
        push_to_hub: ``(obj, repo_id, **options) -> PushResult``, or its path.
        from_pretrained: ``(spec, **options) -> obj``, or its path.
    """

    name: str
    summary: str
    save_pretrained: Callable[..., Any] | str
    push_to_hub: Callable[..., Any] | str
    from_pretrained: Callable[..., Any] | str


HUB_FORMATS: Registry[HubFormat] = Registry("Hub format", "hub_format")


def register_hub_format(entry: HubFormat, *, overwrite: bool = False) -> HubFormat:
    """Add a Hub format (see :class:`HubFormat`)."""
    return HUB_FORMATS.register(entry, overwrite=overwrite)


def hub_verb(format_name: str, verb: str) -> Callable[..., Any]:
    """The function behind ``verb`` (``"save_pretrained"``, ``"push_to_hub"``, ``"from_pretrained"``) of a format.

    Raises:
        ConfigError: no format has that name.
    """
    return resolve(getattr(HUB_FORMATS.get(format_name), verb))
