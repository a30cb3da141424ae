"""Model adapters: timm, transformers, the CIFAR ResNets and the embedded default."""

from . import cifar_resnet  # registers resnet{20,32,44,56}_cifar with timm
from .loader import default_model_dir, detect_library, load_model
from .preprocess import Preprocess
from .vision_model import BN_TYPES, ModelSource, VisionModel, find_bn_layers

__all__ = [
    "BN_TYPES",
    "ModelSource",
    "Preprocess",
    "VisionModel",
    "cifar_resnet",
    "default_model_dir",
    "detect_library",
    "find_bn_layers",
    "load_model",
]
