"""Eval-time preprocessing as one plain, serialisable object.

Both adapters translate their library's notion (timm's data config, a transformers image processor)
into :class:`Preprocess`, so every stage sees the same thing: resize, centre crop, to tensor,
normalise. Synthesis also needs the inverse (normalised tensor -> pixels), which lives here too.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image, ImageCms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ..errors import ImageDecodeError

__all__ = ["Preprocess", "to_mode"]

logger = logging.getLogger(__name__)

_PIL_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float gray image -> 8-bit ``L`` with its range kept (PIL's own conversion clips
    every value above 255 to white)."""
    values = np.asarray(image, dtype=np.float64)
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    top = float(values.max()) if values.size else 0.0
    if image.mode == "F":
        scale = 255.0 if top <= 1.0 else 1.0  # floats in [0, 1] (the usual), else already 0-255
    elif image.mode.startswith("I;16") or 255 < top <= 65535:
        scale = 255.0 / 65535.0  # a 16-bit image (PNG, TIFF)
    elif top > 65535:
        scale = 255.0 / top
    else:
        scale = 1.0
    return Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8), mode="L")


def _with_profile(image: Image.Image) -> Image.Image | None:
    """A CMYK or Lab image converted to sRGB through colour management (its embedded ICC profile), or ``None``."""
    try:
        if image.mode == "LAB":
            source = ImageCms.createProfile("LAB")
        elif image.info.get("icc_profile"):
            source = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
        else:
            return None
        return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError) as err:  # a broken profile: PIL's plain conversion instead
        logger.debug("could not colour-manage a %s image: %s", image.mode, err)
        return None


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """Convert ``image`` of any mode PIL opens to ``mode`` (``RGB`` or ``L``) faithfully: 16-bit and float images
    keep their range, CMYK and Lab go through colour management, premultiplied alpha is undone first; alpha is
    dropped, as timm and torchvision do."""
    if image.mode == mode:
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _to_8bit(image)
    elif image.mode == "LAB" or (image.mode == "CMYK" and mode == "RGB"):
        image = _with_profile(image) or image
    elif image.mode in ("La", "RGBa"):
        image = image.convert("LA" if image.mode == "La" else "RGBA")
    try:
        return image if image.mode == mode else image.convert(mode)
    except ValueError as err:  # a mode PIL cannot convert: this image is skipped and counted, like a broken file
        raise ImageDecodeError(f"cannot convert a {image.mode} image to {mode}: {err}") from err


@dataclass(frozen=True)
class Preprocess:
    """Resize -> centre crop -> [0, 1] tensor -> normalise, as used at evaluation time.

    Args:
        input_size: ``(channels, height, width)`` the model takes.
        mean: per-channel mean subtracted after scaling pixels to [0, 1].
        std: per-channel standard deviation divided by.
        interpolation: resampling filter name (``bilinear``, ``bicubic``, ...).
        resize: target of the resize step: an int resizes the shorter side, ``(h, w)`` resizes
            exactly, ``None`` skips resizing.
        crop: ``(h, w)`` of the centre crop, or ``None``.
    """

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    resize: int | tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if isinstance(self.resize, (list, tuple)):
            object.__setattr__(self, "resize", tuple(int(v) for v in self.resize))
        if self.crop is not None:
            object.__setattr__(self, "crop", tuple(int(v) for v in self.crop))
        if len(self.mean) != self.input_size[0] or len(self.std) != self.input_size[0]:
            raise ValueError(f"mean/std need {self.input_size[0]} values, got {self.mean} and {self.std}")

    @classmethod
    def from_timm_config(cls, cfg: dict[str, Any]) -> "Preprocess":
        """Build from a timm data config (``timm.data.resolve_data_config`` output)."""
        channels, height, width = cfg["input_size"]
        crop_pct = float(cfg.get("crop_pct") or 1.0)
        mode = cfg.get("crop_mode", "center")
        if mode == "squash":
            resize: int | tuple[int, int] = (math.floor(height / crop_pct), math.floor(width / crop_pct))
        elif height == width:
            resize = math.floor(height / crop_pct)
        else:
            resize = (math.floor(height / crop_pct), math.floor(width / crop_pct))
        return cls(
            input_size=(channels, height, width),
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            interpolation=cfg.get("interpolation", "bilinear") or "bilinear",
            resize=resize,
            crop=(height, width),
            extra={"crop_pct": crop_pct, "crop_mode": mode},
        )

    @classmethod
    def from_image_processor(cls, processor: Any, *, num_channels: int = 3) -> "Preprocess":
        """Build from a transformers image processor (ViT, ConvNeXt/ResNet, MobileNet, EfficientNet...)."""
        size = dict(getattr(processor, "size", None) or {})
        crop_size = dict(getattr(processor, "crop_size", None) or {})
        do_resize = getattr(processor, "do_resize", True)
        do_crop = getattr(processor, "do_center_crop", False) and bool(crop_size)
        crop_pct = getattr(processor, "crop_pct", None)
        resize: int | tuple[int, int] | None = None
        crop: tuple[int, int] | None = None
        if "shortest_edge" in size:
            edge = int(size["shortest_edge"])
            if crop_pct is not None and edge < 384:
                # ConvNeXt-style processors (also used by ResNet): resize edge/crop_pct, crop edge.
                resize, crop = int(edge / crop_pct), (edge, edge)
            elif crop_pct is not None:
                resize = (edge, edge)
            else:
                resize = edge
        elif "height" in size and "width" in size:
            resize = (int(size["height"]), int(size["width"]))
        if not do_resize:
            resize = None
        if do_crop:
            crop = (int(crop_size["height"]), int(crop_size["width"]))
        if crop is not None:
            height, width = crop
        elif isinstance(resize, tuple):
            height, width = resize
        elif isinstance(resize, int):
            height = width = resize
        else:
            raise ValueError(f"cannot infer the input size from image processor {type(processor).__name__}")
        if getattr(processor, "do_normalize", True):
            mean, std = processor.image_mean, processor.image_std
        else:
            mean, std = (0.0,) * num_channels, (1.0,) * num_channels
        if isinstance(mean, (int, float)):
            mean, std = (mean,) * num_channels, (std,) * num_channels
        scale = float(getattr(processor, "rescale_factor", 1 / 255) or 1 / 255) * 255.0
        if getattr(processor, "do_rescale", True) and not math.isclose(scale, 1.0, rel_tol=1e-4):
            # A processor that scales pixels to another range (EfficientNet's 1/127.5) is folded into
            # mean/std, so images still go through one [0, 1] -> normalise step.
            mean = tuple(m / scale for m in mean)
            std = tuple(s / scale for s in std)
        if getattr(processor, "rescale_offset", False):
            mean = tuple(m + 0.5 * s for m, s in zip(mean, std))
        resample = getattr(processor, "resample", 2)
        interpolation = _PIL_RESAMPLE_NAMES.get(int(getattr(resample, "value", resample) or 2), "bilinear")
        return cls(
            input_size=(num_channels, height, width),
            mean=tuple(mean),
            std=tuple(std),
            interpolation=interpolation,
            resize=resize,
            crop=crop,
            extra={"image_processor": type(processor).__name__},
        )

    # ---- images -> tensors -------------------------------------------------------------------
    def __call__(self, image: Image.Image) -> torch.Tensor:
        """One PIL image (any mode, any size) -> normalised ``float32`` tensor ``(C, H, W)``."""
        return self.normalize(self.to_unit(image))

    def to_unit(self, image: Image.Image) -> torch.Tensor:
        """Resize and crop, then scale pixels to [0, 1] without normalising."""
        image = to_mode(image, "RGB" if self.input_size[0] == 3 else "L")
        if self.resize is not None:
            target = self.resize
            current = (image.height, image.width)
            if isinstance(target, int):
                needed = min(current) != target
            else:
                needed = current != tuple(target)
            if needed:
                image = TF.resize(image, list(target) if isinstance(target, tuple) else target,
                                  interpolation=InterpolationMode(self.interpolation), antialias=True)
        if self.crop is not None and (image.height, image.width) != tuple(self.crop):
            image = TF.center_crop(image, list(self.crop))
        if (image.height, image.width) != tuple(self.input_size[1:]):
            image = TF.resize(image, list(self.input_size[1:]), interpolation=InterpolationMode(self.interpolation),
                              antialias=True)
        return TF.pil_to_tensor(image).float().div_(255.0)

    def batch(self, images: Iterable[Image.Image]) -> torch.Tensor:
        """A batch of PIL images -> ``(N, C, H, W)`` tensor."""
        return torch.stack([self(image) for image in images])

    def row(self, example: dict[str, Any], image_column: str = "image") -> torch.Tensor:
        """One ``datasets`` row (decoded image under ``image_column``) -> tensor."""
        return self(example[image_column])

    # ---- tensor space ------------------------------------------------------------------------
    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (-1, 1, 1)
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> model input space."""
        mean, std = self._stats(pixels)
        return (pixels - mean) / std

    def denormalize(self, inputs: torch.Tensor) -> torch.Tensor:
        """Model input space -> [0, 1] pixels (not clamped)."""
        mean, std = self._stats(inputs)
        return inputs * std + mean

    def valid_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(low, high)`` bounds of the normalised input space, shaped ``(C, 1, 1)``."""
        zero = torch.zeros(self.input_size[0], 1, 1)
        return self.normalize(zero), self.normalize(zero + 1.0)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_size"] = list(self.input_size)
        return data
