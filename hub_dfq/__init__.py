"""hub-dfq: data-free quantization and BN-statistics audits for Hugging Face Hub vision models.

Public API, one entry point per job::

    import hub_dfq
    model = hub_dfq.load_model("default")          # or "timm/resnet18.a1_in1k", "local-dir:PATH"
    data = hub_dfq.load_images("default")          # or a Hub dataset id, parquet, image folder
    hub_dfq.evaluate_accuracy(model, data)          # {"top1": .., "top5": .., "n": ..}
"""

from .audit import AuditReport, audit
from .data import ImageData, iter_batches, load_images
from .errors import HubDfqError
from .evaluation import evaluate_accuracy
from .models import ModelSource, Preprocess, VisionModel, load_model
from .quant import QuantConfig, QuantizedModel, QuantScheme, quantize
from .synth import synthesize

__version__ = "0.1.0"

__all__ = [
    "AuditReport",
    "HubDfqError",
    "ImageData",
    "ModelSource",
    "Preprocess",
    "QuantConfig",
    "QuantScheme",
    "QuantizedModel",
    "VisionModel",
    "__version__",
    "audit",
    "evaluate_accuracy",
    "iter_batches",
    "load_images",
    "load_model",
    "quantize",
    "synthesize",
]
