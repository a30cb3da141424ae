"""`VisionModel`: the one object every pipeline stage takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from PIL import Image
from torch import nn

from .adapters import TracingHints, tracing_hints
from .preprocess import Preprocess

__all__ = ["VisionModel", "ModelSource", "BN_TYPES", "bn_remainder", "find_bn_layers"]

# timm's BatchNormAct2d and friends subclass these, so isinstance covers them.
BN_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
WEIGHT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from, for cards and reproducibility.

    Args:
        spec: the spec as the user wrote it.
        library: ``"timm"`` or ``"transformers"``.
        architecture: timm architecture name or transformers ``model_type``.
        repo_id: Hub repository, if loaded from the Hub.
        revision: revision the user asked for.
        commit: resolved commit sha of a Hub download.
        path: local folder the weights were read from.
        license: licence identifier from the model card or config, if known.
    """

    spec: str
    library: str
    architecture: str
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    path: str | None = None
    license: str | None = None

    @property
    def url(self) -> str | None:
        """Hub URL of the exact revision, when there is one."""
        if not self.repo_id:
            return None
        from huggingface_hub import (
            constants,  # why: only a Hub URL needs the client; models load without it
        )

        rev = self.commit or self.revision
        base = f"{constants.ENDPOINT}/{self.repo_id}"
        return f"{base}/tree/{rev}" if rev else base


def bn_remainder(bn: nn.Module) -> nn.Module:
    """What a BN layer applies after normalising: timm's BatchNormAct2d keeps its dropout and
    activation; a plain BatchNorm leaves ``nn.Identity``."""
    act = getattr(bn, "act", None)
    drop = getattr(bn, "drop", None)
    parts = [m for m in (drop, act) if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
    if not parts:
        return nn.Identity()
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


def find_bn_layers(module: nn.Module, example: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """BatchNorm layers of ``module`` in the order the forward pass calls them.

    Layers the forward pass never calls are left out; a layer called twice is listed once.
    """
    names = {m: n for n, m in module.named_modules() if isinstance(m, BN_TYPES)}
    order: list[nn.Module] = []
    handles = [m.register_forward_pre_hook(lambda m, _: order.append(m)) for m in names]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for handle in handles:
            handle.remove()
    seen: set[int] = set()
    layers = []
    for m in order:
        if id(m) not in seen:
            seen.add(id(m))
            layers.append((names[m], m))
    return layers


def _quantized_summary(qc: dict[str, Any] | None) -> str | None:
    if not qc:
        return None
    algorithm = qc.get("algorithm", qc.get("method", "?"))
    return f"W{qc.get('weights', '?')}A{qc.get('activations', '?')} ({algorithm}, {qc.get('calibration_source', '?')})"


@dataclass
class VisionModel:
    """An eval-mode image classifier with everything the pipeline needs beside it.

    Args:
        module: ``nn.Module`` mapping a normalised ``(N, C, H, W)`` batch to logits ``(N, classes)``.
        preprocess: eval-time preprocessing, usable on PIL images and dataset rows.
        labels: class names, index-aligned with the logits.
        source: provenance (spec, library, revision, licence).
        config: the library config needed to rebuild the architecture (timm ``config.json`` or the
            transformers ``PretrainedConfig`` as a dict).
        library_model: the object the library returned (the timm model, or the transformers
            ``PreTrainedModel`` that ``module`` wraps).
        quantization_config: for a hub-dfq quantized checkpoint, its ``quantization_config``
            (``module`` then computes the integer model).
    """

    module: nn.Module
    preprocess: Preprocess
    labels: list[str]
    source: ModelSource
    config: dict[str, Any] = field(default_factory=dict)
    library_model: nn.Module | None = None
    quantization_config: dict[str, Any] | None = None
    bn_layers: list[tuple[str, nn.Module]] = field(init=False)
    _gflops: float | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.module.eval()
        self.bn_layers = find_bn_layers(self.module, self.example_input(1))

    # ---- shape and inventory -------------------------------------------------------------------
    @property
    def tracing_hints(self) -> TracingHints:
        """What ``torch.fx`` keeps whole in this model (its family's adapter says; see
        :class:`~hub_dfq.models.adapters.TracingHints`)."""
        return tracing_hints(self.source.library or None)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return self.preprocess.input_size

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def device(self) -> torch.device:
        for tensor in self.module.parameters():
            return tensor.device
        return torch.device("cpu")

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        return torch.zeros(batch_size, *self.input_size, device=self.device)

    def weight_layers(self) -> list[tuple[str, nn.Module]]:
        """Convolutions and linear layers, in module order."""
        return [(n, m) for n, m in self.module.named_modules() if isinstance(m, WEIGHT_LAYER_TYPES)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def gflops(self) -> float:
        """Floating-point operations (GFLOP, 2 per multiply-accumulate) of one image's forward pass; what sizes
        whether a preset's budget is planned for the device (:mod:`hub_dfq.budget`). Measured once, then cached."""
        if self._gflops is None:
            from torch.utils.flop_counter import FlopCounterMode  # why: only needed here, imports sympy

            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                self.module(self.example_input(1))
            self._gflops = counter.get_total_flops() / 1e9
        return self._gflops

    def info(self) -> dict[str, Any]:
        """A JSON-serialisable summary (what ``hub-dfq info`` prints)."""
        return {
            "spec": self.source.spec,
            "library": self.source.library,
            "architecture": self.source.architecture,
            "repo_id": self.source.repo_id,
            "commit": self.source.commit,
            "license": self.source.license,
            "input_size": list(self.input_size),
            "preprocess": self.preprocess.to_dict(),
            "parameters": self.num_parameters(),
            "bn_layers": len(self.bn_layers),
            "conv_layers": sum(1 for _, m in self.weight_layers() if not isinstance(m, nn.Linear)),
            "linear_layers": sum(1 for _, m in self.weight_layers() if isinstance(m, nn.Linear)),
            "num_classes": self.num_classes,
            "labels": list(self.labels),
            "quantized": _quantized_summary(self.quantization_config),
        }

    # ---- inference -----------------------------------------------------------------------------
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Logits for a normalised batch."""
        return self.module(pixel_values)

    @torch.inference_mode()
    def predict(self, images: Iterable[Image.Image]) -> list[str]:
        """Top-1 label names for PIL images."""
        batch = self.preprocess.batch(images).to(self.device)
        return [self.labels[i] for i in self.module(batch).argmax(-1).tolist()]

    def to(self, device: str | torch.device) -> "VisionModel":
        self.module.to(device)
        return self
