"""transformers image classifiers (``AutoModelForImageClassification``)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .checkpoints import check_weights_present, mismatch_error, unsafe_checkpoint_error, weights_error
from .preprocess import Preprocess
from .vision_model import ModelSource, VisionModel

logger = logging.getLogger(__name__)

__all__ = ["LogitsModule", "load_transformers_folder"]


class LogitsModule(nn.Module):
    """Makes a transformers classifier a plain ``pixel_values -> logits`` module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def _default_processor_preprocess(config) -> Preprocess:
    size = int(getattr(config, "image_size", 224) or 224)
    channels = int(getattr(config, "num_channels", 3) or 3)
    logger.warning("no preprocessor_config.json; assuming %dx%d inputs with ImageNet mean/std", size, size)
    return Preprocess(input_size=(channels, size, size), mean=(0.485, 0.456, 0.406)[:channels],
                      std=(0.229, 0.224, 0.225)[:channels], resize=(size, size))


def _from_pretrained(folder: Path, trust_remote_code: bool) -> nn.Module:
    # why: transformers takes seconds to import; only transformers models pay for it
    from transformers import AutoModelForImageClassification

    check_weights_present(folder)
    try:
        model, info = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=trust_remote_code,
                                                                      output_loading_info=True)
    except Exception as err:  # noqa: BLE001 - translated to UnsafeCheckpointError/CheckpointError or re-raised as is
        translated = unsafe_checkpoint_error(folder, err) or weights_error(folder, err)
        if translated is not None:
            raise translated from err
        if isinstance(err, RuntimeError) and "mismatched_sizes" in str(err):  # its load report went to the log
            raise mismatch_error(folder, mismatched=["see the load report above"]) from err
        raise
    # transformers initialises missing weights at random with only a warning: a classifier that silently
    # predicts noise is worse than an error
    missing = list(info.get("missing_keys") or [])
    mismatched = [str(m[0]) if isinstance(m, (tuple, list)) else str(m) for m in info.get("mismatched_keys") or []]
    if missing or mismatched:
        raise mismatch_error(folder, missing=missing, unexpected=list(info.get("unexpected_keys") or []),
                             mismatched=mismatched)
    return model


def load_transformers_folder(folder: Path, source: ModelSource, *, trust_remote_code: bool = False,
                             pretrained: bool = True) -> VisionModel:
    """Load a folder saved by ``save_pretrained`` (``config.json`` with ``model_type``).

    With ``pretrained=False`` only the architecture is built (random weights), e.g. to receive a
    quantized state.
    """
    # why: transformers takes seconds to import; only transformers models pay for it
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForImageClassification,
    )
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    )

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise UnsupportedModelError(
                f"{source.spec} needs custom code from its repository; pass `trust_remote_code=True` only if you "
                "trust its authors"
            ) from err
        raise UnsupportedModelError(f"transformers cannot read the config of {source.spec}: {err}") from err
    remote = bool(getattr(config, "auto_map", None)) and trust_remote_code
    if config.model_type not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES and not remote:
        raise UnsupportedModelError(
            f"{source.spec} is a {config.model_type!r} model, which is not an image classifier "
            "(AutoModelForImageClassification): hub-dfq needs one that outputs class logits"
        )
    if pretrained:
        model = _from_pretrained(folder, trust_remote_code)
    else:
        # A hub-dfq quantized checkpoint's config names our quantizer; the bare architecture must not.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForImageClassification.from_config(config, trust_remote_code=trust_remote_code)
    if (folder / "preprocessor_config.json").is_file():
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
        preprocess = Preprocess.from_image_processor(processor, num_channels=int(getattr(config, "num_channels", 3)))
    else:
        preprocess = _default_processor_preprocess(config)
    id2label = getattr(config, "id2label", None) or {}
    labels = [str(id2label.get(i, id2label.get(str(i), f"class_{i}"))) for i in range(config.num_labels)]
    return VisionModel(
        module=LogitsModule(model).eval(),
        preprocess=preprocess,
        labels=labels,
        source=source,
        config=config.to_dict(),
        library_model=model,
    )
