"""Model adapters: timm, transformers, the CIFAR ResNets, the embedded default; :func:`load_model`.

``loader`` parses every model spec (Hub id, folder, timm name, ``default``), ``adapters`` decides which
library reads a folder, ``timm_adapter`` and ``transformers_adapter`` turn the library's model into a
:class:`~hub_dfq.models.vision_model.VisionModel`, and ``cifar_resnet`` registers the CIFAR ResNets
with timm. Nothing is re-exported here: importing a module of this package costs only that module.
"""
