"""timm models: a folder laid out like a timm Hub repo, or a name in timm's registry."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import timm
from timm.data import ImageNetInfo, infer_imagenet_subset, resolve_data_config
from timm.layers import Conv2dSame
from timm.models import get_notrace_functions, get_notrace_modules

from ..errors import UnsupportedModelError
from .adapters import TracingHints
from .checkpoints import check_weights_present, unsafe_checkpoint_error, weights_error
from .preprocess import Preprocess
from .vision_model import ModelSource, VisionModel

logger = logging.getLogger(__name__)

__all__ = ["load_timm_folder", "load_timm_name", "timm_labels", "timm_tracing_hints"]


def timm_tracing_hints() -> TracingHints:
    """The layers and functions timm itself marks as untraceable by ``torch.fx`` (public names of
    ``timm.models``), kept whole when a timm model is prepared for quantization, and its TF-"same" convolution."""
    return TracingHints(leaf_modules=tuple(get_notrace_modules()), leaf_functions=tuple(get_notrace_functions()),
                        same_padded=(Conv2dSame,))


def timm_labels(model: Any, num_classes: int) -> list[str]:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    names = cfg.get("label_names")
    if names and len(names) == num_classes:
        return [str(n) for n in names]
    if num_classes in (1000, 11821, 21841, 21843):
        subset = infer_imagenet_subset(model)
        if subset:
            try:
                info = ImageNetInfo(subset)
                return [info.index_to_description(i) for i in range(num_classes)]
            except (OSError, KeyError, IndexError, ValueError) as err:  # timm's label files are package data
                logger.warning("timm's ImageNet label names could not be read (%s); using class_N names", err)
    return [f"class_{i}" for i in range(num_classes)]


def _wrap(model: Any, source: ModelSource, config: dict[str, Any]) -> VisionModel:
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if num_classes <= 0:
        raise UnsupportedModelError(
            f"{source.spec} has no classifier head (num_classes=0): hub-dfq needs an image classifier"
        )
    preprocess = Preprocess.from_timm_config(resolve_data_config(model=model))
    return VisionModel(
        module=model.eval(),
        preprocess=preprocess,
        labels=timm_labels(model, num_classes),
        source=source,
        config=config,
        library_model=model,
    )


def load_timm_folder(folder: Path, source: ModelSource, *, pretrained: bool = True,
                     trust_remote_code: bool = False) -> VisionModel:
    """Load a folder with a timm ``config.json`` (``architecture`` key) and weights.

    ``trust_remote_code`` is accepted for the adapter interface; timm models never run repo code.
    """
    config = json.loads((folder / "config.json").read_text())
    architecture = config.get("architecture", "")
    if not timm.is_model(architecture):
        raise UnsupportedModelError(
            f"timm does not know the architecture {architecture!r} of {source.spec} "
            f"(timm {timm.__version__}): upgrade timm, or check the config's 'architecture'"
        )
    if pretrained:
        check_weights_present(folder)
    try:
        model = timm.create_model(f"local-dir:{folder}", pretrained=pretrained)
    except Exception as err:  # noqa: BLE001 - translated to UnsafeCheckpointError/CheckpointError or re-raised as is
        translated = unsafe_checkpoint_error(folder, err) or weights_error(folder, err)
        if translated is not None:
            raise translated from err
        raise
    return _wrap(model, source, config)


def load_timm_name(name: str, source: ModelSource, *, pretrained: bool = True) -> VisionModel:
    """Create a registered timm model whose weights need no download (embedded file or random)."""
    model = timm.create_model(name, pretrained=pretrained)
    cfg = dict(model.pretrained_cfg)
    cfg.pop("file", None)
    config = {
        "architecture": model.default_cfg.get("architecture", name.split(".")[0]),
        "num_classes": model.num_classes,
        "pretrained_cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
    }
    return _wrap(model, source, config)
