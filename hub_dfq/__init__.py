"""hub-dfq: data-free quantization and BN-statistics audits for Hugging Face Hub vision models.

Public API, one entry point per job::

    import hub_dfq
    model = hub_dfq.load_model("default")          # or "timm/resnet18.a1_in1k", "local-dir:PATH"
    data = hub_dfq.load_images("default")          # or a Hub dataset id, parquet, image folder
    hub_dfq.evaluate_accuracy(model, data)          # {"top1": .., "top5": .., "n": ..}
    synthetic = hub_dfq.synthesize(model, "bns", n=256)
    qmodel = hub_dfq.quantize(model, weights=4, activations=4, calibration="bns")
    hub_dfq.push_to_hub(qmodel, "me/model-w4a4-dfq")
    hub_dfq.export_onnx(qmodel, "model.onnx")      # integer kernels in ONNX Runtime: hub_dfq.load_onnx
    report = hub_dfq.audit(model, ["default", synthetic])
"""

from .audit import AuditReport, audit
from .data import ImageData, iter_batches, load_images
from .errors import HubDfqError
from .evaluation import evaluate_accuracy
from .export import export_onnx, from_pretrained, load_onnx, push_to_hub, save_pretrained
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
    "export_onnx",
    "from_pretrained",
    "iter_batches",
    "load_images",
    "load_model",
    "load_onnx",
    "push_to_hub",
    "quantize",
    "save_pretrained",
    "synthesize",
]
