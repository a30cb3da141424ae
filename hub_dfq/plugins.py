"""What hub-dfq adds to other libraries, registered when (and only when) those libraries are imported.

- timm: the CIFAR ResNets (``resnet20_cifar`` ...) join timm's model registry;
- transformers: the ``hub_dfq`` quantization method, so ``AutoModelForImageClassification.from_pretrained``
  loads hub-dfq checkpoints.

Importing either library costs seconds; ``import hub_dfq`` must not pay that for a library the
program may never use, so registration waits for the library's own import (wrapt's post-import
hooks; immediately if it is already imported).

It also wires hub-dfq's own layers: the Hub layer's formats (:mod:`hub_dfq.formats`), which the
objects of lower layers use for ``save_pretrained`` / ``push_to_hub``, and its model adapter for
quantized checkpoints (:mod:`hub_dfq.hub.adapter`), through which ``load_model`` reads them, are
registered at once (the Hub package's ``__init__`` is cheap; its heavy modules load on first use).
"""

from __future__ import annotations

import logging

import wrapt

logger = logging.getLogger(__name__)

__all__ = ["install"]

_installed = False


def _register_timm_models(_module) -> None:
    # why: runs when timm is imported (see the module docstring), never at `import hub_dfq`
    from .models import cifar_resnet  # noqa: F401  (registers with timm on import)


def _register_transformers_quantizer(_module) -> None:
    try:  # why: runs when transformers loads its quantizers (see the module docstring)
        from .hub import transformers_plugin  # noqa: F401  (registers on import)
    except ImportError as err:
        # transformers without quantizer registration (older than 4.46): hub_dfq.from_pretrained still works
        logger.warning("transformers cannot load hub-dfq checkpoints directly (%s); use hub_dfq.from_pretrained", err)


def install() -> None:
    """Arrange the registrations above (idempotent)."""
    global _installed
    if _installed:
        return
    # why: `import hub_dfq` calls install() before any sub-module can be imported, so the Hub formats and model
    # adapter are registered before a QuantizedModel exists or a model loads (see hub_dfq.formats); the package is cheap
    from . import hub  # noqa: F401  (registers on import)
    wrapt.register_post_import_hook(_register_timm_models, "timm")
    wrapt.register_post_import_hook(_register_transformers_quantizer, "transformers.quantizers.auto")
    _installed = True
