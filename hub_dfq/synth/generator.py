"""Generating one batch of images: Gaussian noise, or inputs optimised for a method's loss.

All methods work in the model's normalised input space and project onto the valid pixel box after
every step, so the images written as uint8 PNG are (up to rounding) the images optimised. The
model is used through a private copy: frozen parameters (no weight gradients), channels-last
memory, optional bf16 autocast; the caller's model is never modified.
"""

from __future__ import annotations

import copy
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..allocator import heap_reuse
from ..errors import DivergedError, UnsupportedModelError
from ..models.checks import check_bn_statistics
from ..models.vision_model import WEIGHT_LAYER_TYPES, VisionModel
from ..registry import resolve
from .bns import StopForward, bn_loss, swap_batchnorms
from .config import SynthConfig
from .loop_convs import prepare_loop_convs
from .objectives import Step
from .parameterisation import parameterisation_for
from .priors import NOISES, cosine_lr
from .registry import BN_LOSSES, SYNTH_METHODS, methods_for

logger = logging.getLogger(__name__)

__all__ = ["BatchResult", "BatchGenerator", "check_model_supports"]

ALGORITHM_VERSION = 2  # of the loop below; bump whenever it changes the bytes it writes (part of cache keys)

# forwards of the layers autocast runs in bfloat16
_LOW_PRECISION_FORWARDS = tuple(layer.forward for layer in WEIGHT_LAYER_TYPES)


@dataclass
class BatchResult:
    """One generated batch.

    Attributes:
        pixels: ``uint8`` images ``(B, C, H, W)``, exactly what is stored.
        labels: class index per image (target, or the model's prediction on ``pixels``).
        start: per-layer BN divergence of the initial batch (empty for models without BN).
        end: per-layer BN divergence of the stored ``pixels``.
        losses: optimisation loss at each step.
    """

    pixels: torch.Tensor
    labels: torch.Tensor
    start: dict[str, float]
    end: dict[str, float]
    losses: list[float]


def check_model_supports(model: VisionModel, method: str) -> None:
    """Refuse methods the model cannot serve (BN methods without BatchNorm), naming the methods that work."""
    working = methods_for(has_bn=bool(model.bn_layers))
    descriptor = SYNTH_METHODS.get(method, among=working)
    if descriptor.needs_bn and not model.bn_layers:
        raise UnsupportedModelError(
            f"{model.source.spec} has no BatchNorm layers, so method {method!r} has no statistics to match: "
            f"methods that work for this model: {', '.join(working)}")
    if descriptor.needs_bn:  # a NaN statistic would be blamed on the learning rate (a model built in Python is
        # unchecked)
        check_bn_statistics(model.module, spec=model.source.spec)


class BatchGenerator:
    """Generates batches for one :class:`SynthConfig` on one model.

    Args:
        model: the source model (left unchanged).
        config: the run's arguments.
    """

    def __init__(self, model: VisionModel, config: SynthConfig):
        check_model_supports(model, config.method)
        self.model = model
        self.config = config
        self.method = config.method_info
        self._loss = resolve(self.method.loss) if self.method.optimised else None
        self._augment = resolve(self.method.augment) if self.method.augment is not None else None
        self.device = model.device
        module = copy.deepcopy(model.module).eval()
        module.requires_grad_(False)  # only the inputs are optimised: no weight gradients at all
        # channels-last convolutions are markedly faster in oneDNN (and on tensor cores)
        self.channels_last = len(model.input_size) == 3
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module = module
        self.bn_layers = self._same_layers(module, model)
        # The optimisation loop runs its own copy: each BN computes its output and the loss's moments
        # in one autograd node, and conv/linear weights are held in bf16 already (autocast would
        # cast every weight on every step: its cast cache skips frozen parameters). `measure` keeps
        # the untouched float32 module, so reported divergences are the model's own.
        loop = swap_batchnorms(copy.deepcopy(module), [name for name, _ in model.bn_layers])
        prepare_loop_convs(loop, config.precision, self.device)  # per-layer dtype, static "same" pads
        if config.precision == "bf16":
            for sub in loop.modules():
                if type(sub).forward in _LOW_PRECISION_FORWARDS:  # subclasses that transform weights stay float
                    sub.to(torch.bfloat16)
        self.loop_module = loop
        self.loop_bn_layers = self._same_layers(loop, model)
        low, high = model.preprocess.valid_range()
        self.low, self.high = low.to(self.device), high.to(self.device)
        self.jitter = self.resolve_jitter(model, config)

    @staticmethod
    def _same_layers(module: nn.Module, model: VisionModel) -> list[tuple[str, nn.Module]]:
        by_name = dict(module.named_modules())
        return [(name, by_name[name]) for name, _ in model.bn_layers]

    @staticmethod
    def resolve_jitter(model: VisionModel, config: SynthConfig) -> int:
        """Jitter in pixels: the configured one, or 1/16 of the image side (2 px on CIFAR, 14 on ImageNet)."""
        if config.regularizers.jitter is not None:
            return int(config.regularizers.jitter)
        return max(1, model.input_size[-1] // 16)

    # ---- helpers -----------------------------------------------------------------------------
    def _autocast(self):
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised inputs -> ``uint8`` pixels (rounded, clamped)."""
        unit = self.model.preprocess.denormalize(x.detach().float()).clamp(0.0, 1.0)
        return unit.mul(255.0).round().to(torch.uint8).contiguous()

    def from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """``uint8`` pixels -> normalised inputs, as the model's preprocessing computes them."""
        return self.model.preprocess.normalize(pixels.float().div(255.0))

    @torch.no_grad()
    def measure(self, x: torch.Tensor, *, logits: bool) -> tuple[dict[str, float], torch.Tensor | None]:
        """Per-layer BN divergence (float32; the loss's reported one) of a batch, and its logits when asked."""
        if not self.bn_layers:
            out = self.module(self._layout(x)) if logits else None
            return {}, out
        reported = BN_LOSSES.get(self.config.loss).reported
        with bn_loss(self.bn_layers, loss=reported, stop_after_last=not logits) as state:
            try:
                out = self.module(self._layout(x))
            except StopForward:
                out = None
            return state.per_layer(), out

    def initial(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Unit-variance noise (white or pink) in the normalised space, projected onto the valid box."""
        shape = (batch, *self.model.input_size)
        noise = NOISES[self.config.regularizers.noise]
        x = noise(shape, generator=generator).to(self.device)
        return torch.maximum(torch.minimum(x, self.high), self.low)

    # ---- one batch ---------------------------------------------------------------------------
    def generate(self, targets: torch.Tensor, generator: torch.Generator, *,
                 on_step: Callable[[int, float], None] | None = None, where: str = "") -> BatchResult:
        """Generate ``len(targets)`` images.

        Args:
            targets: class index per image (used by inception and bns+i).
            generator: CPU random generator of the shard; all randomness is drawn from it.
            on_step: called with ``(step, loss)`` after each optimisation step.
            where: text naming the batch, for error messages.

        Raises:
            DivergedError: the loss became NaN or Inf; nothing of the batch is returned.
        """
        cfg = self.config
        x0 = self.initial(len(targets), generator)
        start, _ = self.measure(x0, logits=False)
        losses: list[float] = []
        x = x0
        if self.method.optimised and cfg.iters > 0:
            x, losses = self._optimise(x0, targets.to(self.device), generator, on_step, where)
        pixels = self.to_pixels(x)
        end, logits = self.measure(self.from_pixels(pixels), logits=True)
        labels = targets.clone() if self.method.class_targets else logits.argmax(-1).cpu()
        return BatchResult(pixels.cpu(), labels.cpu(), start, end, losses)

    def _optimise(self, x0, targets, generator, on_step, where):
        cfg, regularizers, method = self.config, self.config.regularizers, self.method
        space = parameterisation_for(method.parameterisation, tuple(x0.shape[1:]), x0.device)
        params = self._layout(space.to_params(x0.clone())).requires_grad_(True)
        # one fused kernel per step instead of a dozen elementwise passes over the batch
        optimiser = torch.optim.Adam([params], lr=cfg.lr, fused=params.device.type in ("cpu", "cuda") or None)
        losses: list[float] = []
        hooks = (bn_loss(self.loop_bn_layers, loss=cfg.loss, stop_after_last=not method.uses_logits)
                 if method.needs_bn else nullcontext())
        with hooks as state, heap_reuse(params.device.type == "cpu"):
            for step in range(cfg.iters):
                for group in optimiser.param_groups:
                    group["lr"] = cosine_lr(step, cfg.iters, base=cfg.lr, warmup=cfg.warmup)
                optimiser.zero_grad(set_to_none=True)
                x = self._layout(space.to_images(params))
                inputs = x
                if self._augment is not None:
                    inputs = self._augment(x, jitter=self.jitter, flip=regularizers.flip, generator=generator)
                if state is not None:
                    state.reset()
                with self._autocast():
                    try:
                        logits = self.loop_module(inputs)
                    except StopForward:
                        logits = None
                loss = self._loss(Step(x=x, inputs=inputs, logits=logits,
                                       bn_loss=state.total() if state is not None else None,
                                       targets=targets, regularizers=regularizers, index=step, total=cfg.iters))
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise DivergedError(
                        f"the {cfg.method} loss became {value} at step {step + 1} of {cfg.iters}{where}: lower the "
                        f"learning rate `lr` (now {cfg.lr:g}); nothing of this batch was saved")
                loss.backward()
                optimiser.step()
                with torch.no_grad():
                    space.project(params, self.low, self.high)  # projected gradient: stay inside real pixels
                losses.append(value)
                if on_step is not None:
                    on_step(step, value)
        with torch.no_grad():
            x = self._layout(space.to_images(params))
        if not torch.isfinite(x).all():
            raise DivergedError(f"the {cfg.method} inputs became NaN/Inf{where}: lower the learning rate `lr` "
                                f"({cfg.lr:g})")
        return x.detach(), losses
