"""The Hub layer: publishing and reloading what hub-dfq makes.

``mixin`` gives any artefact ``save_pretrained`` / ``push_to_hub`` / ``from_pretrained`` over two hooks
(huggingface_hub's ``ModelHubMixin`` pattern); ``checkpoint`` is the quantized-model format on top of
it (:func:`~hub_dfq.hub.checkpoint.save_pretrained`, :func:`~hub_dfq.hub.checkpoint.push_to_hub`,
:func:`~hub_dfq.hub.checkpoint.from_pretrained`); ``model_card`` renders its card;
``transformers_plugin`` lets ``AutoModelForImageClassification.from_pretrained`` read it. This layer
builds on the quantization core and the backends; neither imports it.
"""
