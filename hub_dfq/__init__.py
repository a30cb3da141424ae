"""hub-dfq: data-free quantization and BN-statistics audits for Hugging Face Hub vision models.

Public API, one entry point per job::

    import hub_dfq
    model = hub_dfq.load_model("default")          # or "timm/resnet18.a1_in1k", "local-dir:PATH"
    data = hub_dfq.load_images("default")          # or a Hub dataset id, parquet, image folder
    hub_dfq.evaluate_accuracy(model, data)          # {"top1": .., "top5": .., "n": ..}
    synthetic = hub_dfq.synthesize(model, "bns", num_images=256)  # a datasets.Dataset
    synthetic.save_pretrained("bns-256")            # its Hub dataset folder; or synthetic.push_to_hub(REPO)
    qmodel = hub_dfq.quantize(model, weights=4, activations=4, calibration="bns")
    # or step by step: prepare -> calibrate -> apply -> freeze (hub_dfq.quant.stages)
    qmodel.save_pretrained("model-w4a4")            # or qmodel.push_to_hub("me/model-w4a4-dfq")
    qmodel = hub_dfq.QuantizedModel.from_pretrained("me/model-w4a4-dfq")
    hub_dfq.export_onnx(qmodel, "model.onnx")      # integer kernels in ONNX Runtime: hub_dfq.load_onnx
    report = hub_dfq.audit(model, ["default", synthetic])
    scores = hub_dfq.score_images(model, "default", keep_fraction=0.95)  # per image
    scores.save_pretrained("scored")                # a Hub dataset folder; or scores.push_to_hub(REPO)

Results that are Hub repos carry the Hub's verbs (``save_pretrained``, ``push_to_hub``,
``QuantizedModel.from_pretrained``, ``SyntheticDataset.from_pretrained``); the functions
``hub_dfq.save_pretrained(qmodel, DIR)``, ``hub_dfq.push_to_hub(qmodel, REPO)`` and
``hub_dfq.from_pretrained(REPO)`` still work, with the same bytes.

Importing ``hub_dfq`` is cheap (no torch, timm, transformers or datasets): every name below is
imported on first use. It also arranges that timm learns the CIFAR ResNets and transformers learns
the ``hub_dfq`` quantization method as soon as either library is imported.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from . import plugins as _plugins

__version__ = "0.1.0"

# name -> module that defines it
_API = {
    "AuditConfig": ".audit.config",
    "AuditReport": ".audit.core",
    "audit": ".audit.core",
    "ImageData": ".data",
    "iter_batches": ".data",
    "load_images": ".data",
    "HubDfqError": ".errors",
    "evaluate_accuracy": ".evaluation",
    "BACKENDS": ".backends.registry",
    "export_onnx": ".backends.onnx",
    "load_onnx": ".backends.onnx",
    "from_pretrained": ".hub.checkpoint",
    "push_to_hub": ".hub.checkpoint",
    "save_pretrained": ".hub.checkpoint",
    "ModelSource": ".models.vision_model",
    "Preprocess": ".models.preprocess",
    "VisionModel": ".models.vision_model",
    "load_model": ".models.loader",
    "QuantConfig": ".quant.config",
    "QuantScheme": ".quant.config",
    "PlacementRules": ".quant.placement",
    "QuantizedModel": ".quant.model",
    "quantize": ".quant.api",
    "PreparedModel": ".quant.stages",
    "prepare": ".quant.stages",
    "calibrate": ".quant.stages",
    "calibrating": ".quant.stages",
    "apply": ".quant.stages",
    "freeze": ".quant.stages",
    "synthesize": ".synth.api",
    "SyntheticDataset": ".synth.dataset",
    "score_images": ".audit.images",
    "ImageScores": ".audit.images",
}

__all__ = sorted(_API) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover - what type checkers and IDEs see
    from .audit.config import AuditConfig  # noqa: F401
    from .audit.core import AuditReport, audit  # noqa: F401
    from .audit.images import ImageScores, score_images  # noqa: F401
    from .backends.onnx import export_onnx, load_onnx  # noqa: F401
    from .backends.registry import BACKENDS  # noqa: F401
    from .data import ImageData, iter_batches, load_images  # noqa: F401
    from .errors import HubDfqError  # noqa: F401
    from .evaluation import evaluate_accuracy  # noqa: F401
    from .hub.checkpoint import from_pretrained, push_to_hub, save_pretrained  # noqa: F401
    from .models.loader import load_model  # noqa: F401
    from .models.preprocess import Preprocess  # noqa: F401
    from .models.vision_model import ModelSource, VisionModel  # noqa: F401
    from .quant.api import quantize  # noqa: F401
    from .quant.config import QuantConfig, QuantScheme  # noqa: F401
    from .quant.model import QuantizedModel  # noqa: F401
    from .quant.placement import PlacementRules  # noqa: F401
    from .quant.stages import PreparedModel, apply, calibrate, calibrating, freeze, prepare  # noqa: F401
    from .synth.api import synthesize  # noqa: F401
    from .synth.dataset import SyntheticDataset  # noqa: F401


class _Package(types.ModuleType):
    """The package module, with its public names resolved on first access."""

    def __getattr__(self, name: str) -> Any:
        if name not in _API:
            raise AttributeError(f"module 'hub_dfq' has no attribute {name!r}")
        value = getattr(importlib.import_module(_API[name], __name__), name)
        types.ModuleType.__setattr__(self, name, value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        # Importing the sub-package hub_dfq.audit binds it as hub_dfq.audit; the verb of that name
        # must stay the function, as it was when this package imported everything eagerly.
        if isinstance(value, types.ModuleType) and name in _API and _API[name] != f".{name}":
            return
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(_API))


sys.modules[__name__].__class__ = _Package
_plugins.install()
