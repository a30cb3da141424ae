"""Quantization with simulated integer arithmetic, calibrated on real or synthetic data.

Layers, bottom-up (lower layers never import higher ones): ``config`` (schemes as data),
``quantizers`` (fake-quant ops on the integer grid), ``observers`` (range finders), ``fold``
(BN folding), ``modules`` (quantized layers and their registry), ``prepare`` (trace, fold, swap,
place quantizers), ``calibrate`` / ``reconstruct`` / ``distill`` (the three methods), ``data``
(calibration sets) and ``api`` (:func:`quantize`).
"""

from .api import METHODS, PRESETS, Preset, QuantizedModel, quantize
from .config import QuantConfig, QuantScheme
from .distill import DistillConfig
from .modules import QuantConv1d, QuantConv2d, QuantLinear, register_qmodule
from .prepare import PrepareReport
from .quantizers import ActQuantizer, WeightQuantizer
from .reconstruct import ReconstructConfig

__all__ = [
    "METHODS",
    "PRESETS",
    "ActQuantizer",
    "DistillConfig",
    "PrepareReport",
    "Preset",
    "QuantConfig",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLinear",
    "QuantScheme",
    "QuantizedModel",
    "ReconstructConfig",
    "WeightQuantizer",
    "quantize",
    "register_qmodule",
]
