"""Knowledge distillation from the full-precision model into the quantized one (the paper's fine-tuning).

The student is the quantized model itself: latent float weights rounded to the integer grid with
the straight-through estimator, learned per-channel weight step sizes and per-tensor activation
step sizes (LSQ). The teacher is a frozen copy of the same graph with quantization switched off.
Only the calibration (synthetic) images are used; labels are never needed.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError, DivergedError
from ..progress import progress_enabled
from ..runner import Runner
from .calibrate import act_quantizers, quant_layers, quant_mode
from .parallel import data_parallel, local_rows
from .reconstruct import cost as reconstruct_cost
from .resume import RunState, quantizer_state

logger = logging.getLogger(__name__)

__all__ = ["DistillConfig", "distill"]

SAVE_EVERY = 50  # steps between saved progress (a save costs about one step)


@dataclass(frozen=True)
class DistillConfig:
    """Settings of distillation.

    Args:
        iters: optimisation steps.
        batch_size: images per step.
        lr_weight: Adam learning rate of the latent weights, in units of each layer's mean weight step.
        init: ``"calibrate"`` starts from calibrated ranges; ``"reconstruct"`` first runs block
            reconstruction, then distils the whole model.
        lr_scale: Adam learning rate of the weight and activation step sizes.
        temperature: softmax temperature of the KL loss.
        flip: random horizontal flips of the calibration images (label-free augmentation).
        seed: seed of batch sampling and augmentation.
    """

    iters: int = 500
    batch_size: int = 64
    lr_weight: float = 1e-2
    lr_scale: float = 1e-5
    temperature: float = 1.0
    flip: bool = True
    seed: int = 0
    init: str = "calibrate"

    def __post_init__(self) -> None:
        if self.init not in ("calibrate", "reconstruct"):
            raise ConfigError(f"distillation init must be 'calibrate' or 'reconstruct', got {self.init!r}")
        if self.iters <= 0 or self.batch_size <= 0 or self.temperature <= 0:
            raise ConfigError(f"distillation needs `iters` > 0, `batch_size` > 0 and a temperature > 0, got "
                              f"{self.iters}, {self.batch_size}, {self.temperature}: with no step the model is only "
                              "calibrated (use algorithm 'calibrate' for that)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1), log_target=True,
                    reduction="batchmean") * (t * t)


def distill(module: nn.Module, data: torch.Tensor, cfg: DistillConfig, *, progress: bool | None = None,
            state: RunState | None = None, runner: Runner | None = None) -> list[float]:
    """Fine-tune a calibrated quantized model to match its own full-precision outputs on ``data``.

    Under ``accelerate launch`` every process computes the loss on its share of each batch and the
    gradients are averaged by DDP (:mod:`hub_dfq.quant.parallel`); every process ends with the same model.

    Args:
        module: a prepared, calibrated model (modified in place; its weights end up frozen).
        data: normalised calibration inputs (synthetic images).
        cfg: distillation settings.
        progress: show a progress bar.
        state: where to save progress every ``SAVE_EVERY`` steps and resume from (the same bytes as one run).
        runner: the processes that share each batch (default: :class:`~hub_dfq.runner.Runner` over the process
            group of the environment).

    Returns:
        The loss every 50 steps.
    """
    layers = [m for _, m in quant_layers(module)]
    acts = [q for _, q in act_quantizers(module) if q.mode == "quant"]
    if cfg.iters == 0:
        return []
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    # The teacher is a frozen copy with quantization off, taken before the latent weights move.
    teacher_module = copy.deepcopy(module).eval()
    for p in teacher_module.parameters():
        p.requires_grad_(False)
    for layer in layers:
        layer.weight_quantizer.thaw(layer.weight)
        layer.weight_quantizer.alpha = None
    params = [p for p in module.parameters()]
    saved_grad = [(p, p.requires_grad) for p in params]
    for p in params:
        p.requires_grad_(False)
    weight_groups = []
    for layer in layers:
        # Adam moves every weight by about lr per step: scale it by the layer's mean step size so
        # that lr_weight means "fraction of a quantization step", the same for every layer.
        step = float(layer.weight_quantizer.scale.mean())
        layer.weight.requires_grad_(True)
        weight_groups.append({"params": [layer.weight], "lr": cfg.lr_weight * step})
        layer.weight_quantizer.scale.requires_grad_(True)
    scale_params = [layer.weight_quantizer.scale for layer in layers] + [q.scale for q in acts]
    for q in acts:
        q.scale.requires_grad_(True)
    optimizer = torch.optim.Adam(weight_groups + [{"params": scale_params, "lr": cfg.lr_scale}])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.iters, eta_min=0.0)
    generator = torch.Generator().manual_seed(cfg.seed)
    runner = Runner() if runner is None else runner
    dist = runner.group  # DDP and the row split work on the group itself
    batch = min(cfg.batch_size, len(data))
    mine = local_rows(batch, dist)
    student = data_parallel(module, dist)
    losses: list[float] = []
    start = 0
    saved = state.load("distill") if state is not None else None
    if saved is not None:
        module.load_state_dict(saved["module"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        generator.set_state(saved["generator"])
        losses, start = list(saved["losses"]), int(saved["steps_done"])
        logger.warning("resuming distillation at step %d of %d (saved in %s)", start, cfg.iters, state.folder)
    bar = tqdm(range(start, cfg.iters), desc="distill", disable=not progress_enabled(progress), leave=False,
               initial=start, total=cfg.iters)
    try:
        for step in bar:
            idx = torch.randint(len(data), (batch,), generator=generator)
            x = data[idx].to(device)
            if cfg.flip:
                flip = torch.rand(len(x), generator=generator) < 0.5
                x = torch.where(flip[:, None, None, None].to(device), x.flip(-1), x)
            x = x[mine]  # every process drew the whole batch (same generator state), each computes its share
            with torch.no_grad(), quant_mode(teacher_module, enabled=False):
                teacher = teacher_module(x)
            loss = _kd_loss(student(x), teacher, cfg.temperature)
            value = loss.detach()
            if dist.enabled:
                # DDP averages gradients over processes: weigh each share so the average is the whole batch's
                loss = loss * (len(x) * dist.world_size / batch)
                value = runner.sum([loss.detach()])[0] / dist.world_size  # the whole batch's loss, everywhere
            if not torch.isfinite(value):
                raise DivergedError(f"distillation diverged at step {step} (loss {value.item()}): lower lr_weight")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                for p in scale_params:
                    p.abs_().clamp_min_(1e-8)
            for q in acts:
                q.project_()
            if step % 50 == 0:
                losses.append(float(value))
                bar.set_postfix(kd=f"{losses[-1]:.4g}")
            if state is not None and (step + 1) % SAVE_EVERY == 0 and step + 1 < cfg.iters:
                state.save("distill", {"module": quantizer_state(module),
                                       "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                       "generator": generator.get_state(), "losses": losses, "steps_done": step + 1})
    finally:
        for p, needed in saved_grad:
            p.requires_grad_(needed)
        for layer in layers:
            layer.weight_quantizer.freeze(layer.weight)
    return losses


# One distillation step of one image (teacher forward, student forward+backward with fake quantization) costs
# about this many float forward+backward passes of it: the slope between two step counts, 2 CPU threads, measured
# 2.6 on EfficientNet-Lite0 and 1.2 on ResNet-20; the larger models' figure, rounded up, plans them.
STEP_PASSES = 3.0


def cost(settings: DistillConfig, images: int, settings_of) -> float:
    """Float forward+backward passes of one image that distillation costs (:mod:`hub_dfq.budget`)."""
    passes = STEP_PASSES * settings.iters * settings.batch_size
    if settings.init == "reconstruct":
        passes += reconstruct_cost(settings_of("reconstruct"), images, settings_of)
    return passes


def run_distill(context) -> dict[str, Any]:
    """The ``distill`` algorithm; with ``init="reconstruct"`` it first runs ``reconstruct``."""
    history: dict[str, Any] = {}
    if context.settings.init == "reconstruct":
        history.update(context.run("reconstruct"))
    history["distill_loss"] = distill(context.module, context.data, context.settings, progress=context.progress,
                                      state=context.state, runner=context.runner)
    return history
