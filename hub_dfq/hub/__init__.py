"""The Hub layer: publishing and reloading what hub-dfq makes.

``mixin`` gives any artefact ``save_pretrained`` / ``push_to_hub`` / ``from_pretrained`` over two hooks
(huggingface_hub's ``ModelHubMixin`` pattern); ``checkpoint`` is the quantized-model format on top of
it (:func:`~hub_dfq.hub.checkpoint.save_pretrained`, :func:`~hub_dfq.hub.checkpoint.push_to_hub`,
:func:`~hub_dfq.hub.checkpoint.from_pretrained`); ``model_card`` renders its card;
``transformers_plugin`` lets ``AutoModelForImageClassification.from_pretrained`` read it. This layer
builds on the quantization core and the backends; neither imports it. The format is registered here
(:mod:`hub_dfq.formats`), so ``QuantizedModel.save_pretrained`` and friends reach it from below, and so is
``adapter``, the model adapter through which ``load_model`` reads a quantized checkpoint folder.
"""

from ..formats import HubFormat, register_hub_format
from . import adapter  # noqa: F401  (registers the quantized checkpoint's model adapter; cheap, like this package)

# In the package, not in checkpoint.py: `import hub_dfq` imports this cheap __init__ (hub_dfq.plugins), so the
# format is known before any QuantizedModel exists; the lazy targets keep that import free of torch.
register_hub_format(HubFormat(
    "quantized-model", summary="a quantized classifier: integer safetensors, config.json with its "
    "quantization_config, model card",
    save_pretrained="hub_dfq.hub.checkpoint:save_pretrained", push_to_hub="hub_dfq.hub.checkpoint:push_to_hub",
    from_pretrained="hub_dfq.hub.checkpoint:from_pretrained"))
