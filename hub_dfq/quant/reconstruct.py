"""Block-wise reconstruction (BRECQ, Li et al. 2021; AdaRound, Nagel et al. 2020; QDrop, Wei et al. 2022).

The prepared graph is cut into blocks (a residual block, the stem, the classifier). Blocks are
fitted one after the other: each block, fed the *quantized* model's input to it, learns whether
each weight rounds up or down (AdaRound) and its activation step sizes (LSQ) so that its output
matches the full-precision block's output on the calibration data. QDrop keeps a random half of
the block's activations unquantized while fitting, which makes the result generalise better from
a small (or synthetic) calibration set.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx
from tqdm.auto import tqdm

from ..allocator import heap_reuse
from ..errors import ConfigError, DivergedError
from ..progress import progress_enabled
from .blocks import Block, BlockWalk, module_device, partition, run_block, run_blocks
from .calibrate import act_quantizers, quant_layers
from .gptq import GPTQConfig, gptq_block, walk_batches
from .gptq import cost as gptq_cost
from .resume import RunState, load_quantizer_state, quantizer_state

logger = logging.getLogger(__name__)

__all__ = ["ReconstructConfig", "Block", "partition", "reconstruct", "run_blocks"]  # blocks re-exported


@dataclass(frozen=True)
class ReconstructConfig:
    """Settings of block reconstruction.

    Args:
        iters: optimisation steps per block.
        batch_size: calibration images per step.
        lr_round: Adam learning rate of the rounding variables.
        lr_act: Adam learning rate of the activation step sizes.
        lr_bias: Adam learning rate of the layers' (BN-folded) biases; 0 keeps them as folded. Learning them lets a
            block cancel the mean shift its 4-bit activations' rounding and clipping add to every output channel.
        round_weight: weight of the rounding regulariser.
        warmup: fraction of the steps without the regulariser.
        beta: start and end of the regulariser's annealed exponent.
        drop_prob: QDrop probability of keeping an activation unquantized while fitting.
        init: where each block's learned rounding starts: ``"gptq"`` (second-order rounding of the block,
            :mod:`hub_dfq.quant.gptq`) or ``"nearest"`` (the float weights).
        margin: start each learned rounding this far from its start's nearest rounding (0.1: soft values 0.1 from
            the integers GPTQ chose); ``None``: at the start's fractional part.
        keep_start: keep a block's start (its GPTQ rounding and calibrated steps) when the fit ends with a larger
            loss on the calibration images than it started with.
        seed: seed of batch sampling and QDrop.
    """

    iters: int = 300
    batch_size: int = 32
    lr_round: float = 1e-1
    lr_act: float = 1e-3
    lr_bias: float = 0.0
    round_weight: float = 0.01
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    drop_prob: float = 0.5
    init: str = "gptq"
    margin: float | None = None
    keep_start: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iters <= 0 or self.batch_size <= 0:
            raise ConfigError(f"reconstruction needs `iters` > 0 and `batch_size` > 0, got {self.iters}, "
                              f"{self.batch_size}: with no step the model is only calibrated (use algorithm "
                              "'calibrate' for that)")
        if min(self.lr_round, self.lr_act, self.lr_bias) < 0.0:
            raise ConfigError("reconstruction learning rates must be >= 0")
        if not 0.0 <= self.drop_prob < 1.0 or not 0.0 <= self.warmup < 1.0:
            raise ConfigError("drop_prob and warmup must be in [0, 1)")
        if self.margin is not None and not 0.0 < self.margin < 0.5:
            raise ConfigError(f"reconstruction margin must be in (0, 0.5), got {self.margin}")
        if self.init not in ("gptq", "nearest"):
            raise ConfigError(f"reconstruction init must be 'gptq' or 'nearest', got {self.init!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rec_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # BRECQ's reconstruction loss: squared error summed over channels, averaged over the rest.
    diff = (pred - target).square()
    return diff.sum(dim=1).mean() if diff.dim() > 1 else diff.mean()


def _fast_layout(t: torch.Tensor) -> torch.Tensor:
    # why: oneDNN's convolutions (depthwise ones above all) run 2-3x faster on channels-last tensors
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def _fit_block(block: Block, inputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
               cfg: ReconstructConfig, generator: torch.Generator, progress: bool) -> float:
    layers = [m for _, m in quant_layers(block.module) if not m.weight_quantizer.frozen]
    acts = [q for _, q in act_quantizers(block.module) if q.mode == "quant"]
    if cfg.iters == 0 or not (layers or acts):
        return float("nan")
    for layer in layers:
        layer.weight_quantizer.init_adaround(layer.weight, cfg.margin)
        layer.weight_quantizer.soft = True
    for q in acts:
        q.scale.requires_grad_(True)
        q.drop_prob = cfg.drop_prob
        q.train()
    groups = []
    if layers:
        groups.append({"params": [layer.weight_quantizer.alpha for layer in layers], "lr": cfg.lr_round})
    if acts:
        groups.append({"params": [q.scale for q in acts], "lr": cfg.lr_act})
    biases = [layer.bias for layer in layers if layer.bias is not None] if cfg.lr_bias > 0 else []
    if biases:
        groups.append({"params": biases, "lr": cfg.lr_bias})
    grad_before = [b.requires_grad for b in biases]
    for b in biases:
        b.requires_grad_(True)
    optimizer = torch.optim.Adam(groups)
    # Rounding variables keep a constant rate: the regulariser is strongest at the end (small beta)
    # and must still be able to push them to 0 or 1. Step sizes follow a cosine decay.
    cosine = lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, cfg.iters) / cfg.iters))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [(lambda step: 1.0) if layers and i == 0 else cosine for i in range(len(groups))])
    n = len(next(iter(inputs.values())))
    device = module_device(block.module)
    inputs = {k: _fast_layout(v) for k, v in inputs.items()}
    targets = {k: _fast_layout(v) for k, v in targets.items()}
    warm = int(cfg.warmup * cfg.iters)
    rec = torch.zeros(())
    bar = tqdm(range(cfg.iters), desc=f"reconstruct {block.name}", disable=not progress_enabled(progress), leave=False)
    try:
        with heap_reuse():  # why: every step frees and re-allocates the same large activations
            for step in bar:
                idx = torch.randint(n, (min(cfg.batch_size, n),), generator=generator)
                out = block.module(*(inputs[k][idx].to(device) for k in block.inputs))
                rec = sum(_rec_loss(o, targets[name][idx].to(device)) for o, name in zip(out, block.outputs))
                loss = rec
                if step >= warm and layers:
                    progress_frac = (step - warm) / max(cfg.iters - warm, 1)
                    beta = cfg.beta[0] + (cfg.beta[1] - cfg.beta[0]) * progress_frac
                    regulariser = sum(layer.weight_quantizer.rounding_regulariser(beta) for layer in layers)
                    loss = loss + cfg.round_weight * regulariser
                if not torch.isfinite(loss):
                    raise DivergedError(f"reconstruction of block {block.name} diverged at step {step} "
                                        f"(loss {loss.item()}): lower lr_act or lr_round")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                for q in acts:
                    q.project_()
                if step % 50 == 0:
                    bar.set_postfix(rec=f"{rec.item():.4g}")
    finally:
        for layer in layers:
            layer.weight_quantizer.soft = False
            layer.weight_quantizer.freeze(layer.weight)
        for b, flag in zip(biases, grad_before):
            b.requires_grad_(flag)
        for q in acts:
            q.scale.requires_grad_(False)
            with torch.no_grad():
                q.scale.abs_().clamp_min_(1e-8)
            q.drop_prob = 0.0
            q.eval()
    return float(rec.detach())


def reconstruct(gm: fx.GraphModule, node_blocks: dict[str, str], data: torch.Tensor, cfg: ReconstructConfig, *,
                gptq: GPTQConfig | None = None, progress: bool | None = None,
                state: RunState | None = None) -> list[dict[str, Any]]:
    """Fit every block of a calibrated model, in order, to its full-precision output on ``data``.

    Args:
        gm: a prepared and calibrated model (modified in place; its weights end up frozen).
        node_blocks: block of every node (from :func:`~hub_dfq.quant.prepare.prepare`).
        data: normalised calibration inputs.
        cfg: reconstruction settings.
        gptq: with ``cfg.init == "gptq"``, the settings of the second-order rounding each block starts from.
        progress: show progress bars.
        state: where to save progress after every block and resume from (the same bytes as one run).

    Returns:
        One record per block: name, loss before and after fitting (on the calibration data).
    """
    blocks = partition(gm, node_blocks)
    generator = torch.Generator().manual_seed(cfg.seed)
    records: list[dict[str, Any]] = []
    walk = BlockWalk(blocks, data)
    saved = state.load("reconstruct") if state is not None else None
    done = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if saved is not None:
            load_quantizer_state(gm, saved["module"])
            generator.set_state(saved["generator"])
            torch.set_rng_state(saved["torch_rng"])
            records, done = list(saved["records"]), int(saved["blocks_done"])
            logger.warning("resuming block reconstruction after block %d of %d (saved in %s)", done, len(blocks),
                           state.folder)
        for index, block in enumerate(tqdm(blocks, desc="blocks", disable=not progress_enabled(progress))):
            targets = walk.targets(block)
            fit = index >= done  # earlier blocks were fitted by the interrupted run: only replayed
            if fit:
                inputs = walk.inputs(block)
                before = _loss_on(block, walk.q_env, targets)
                record: dict[str, Any] = {"block": block.name, "loss_before": before}
                start_loss = before
                if cfg.init == "gptq" and gptq is not None:
                    gptq_block(block.module, walk_batches(block, walk, gptq), gptq)
                    start_loss = record["loss_gptq"] = _loss_on(block, walk.q_env, targets)
                start = _block_state(block)
                record["train_loss"] = _fit_block(block, inputs, targets, cfg, generator, progress)
                # why: on few (or synthetic) images the fit can end worse than where it started, even on the
                # images it saw; the start (GPTQ's rounding, the calibrated steps) is then the better model
                if cfg.keep_start and _loss_on(block, walk.q_env, targets) > start_loss:
                    _restore_block_state(block, start)
                    record["kept"] = "start"
            outputs = walk.advance(index, targets)
            if fit:
                record["loss_after"] = sum(float(_rec_loss(outputs[k], targets[k])) for k in block.outputs)
                records.append(record)
                logger.info("block %s: reconstruction loss %.4g -> %.4g", block.name, before, record["loss_after"])
                if state is not None:
                    state.save("reconstruct", {"module": quantizer_state(gm), "generator": generator.get_state(),
                                               "torch_rng": torch.get_rng_state(), "records": records,
                                               "blocks_done": index + 1})
    return records


@torch.no_grad()
def _block_state(block: Block) -> dict[str, torch.Tensor]:
    """What fitting changes in a block: each weight's integers as they would be frozen now, each bias, each step."""
    state = {}
    for name, layer in quant_layers(block.module):
        if not layer.weight_quantizer.frozen:
            state[f"{name}.weight_int"] = layer.weight_quantizer.integer_weight(layer.weight).round().to(torch.int8)
            if layer.bias is not None:
                state[f"{name}.bias"] = layer.bias.detach().clone()
    state.update({f"{name}.scale": q.scale.detach().clone() for name, q in act_quantizers(block.module)
                  if q.mode == "quant"})
    return state


@torch.no_grad()
def _restore_block_state(block: Block, state: dict[str, torch.Tensor]) -> None:
    for name, layer in quant_layers(block.module):
        if f"{name}.weight_int" in state:
            layer.weight_quantizer.weight_int = state[f"{name}.weight_int"]
        if f"{name}.bias" in state:
            layer.bias.copy_(state[f"{name}.bias"])
    for name, q in act_quantizers(block.module):
        if f"{name}.scale" in state:
            q.scale.copy_(state[f"{name}.scale"])


@torch.no_grad()
def _loss_on(block: Block, env: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> float:
    outputs = run_block(block, env, 128)
    return sum(float(_rec_loss(outputs[k], targets[k])) for k in block.outputs)


# One fitting step of one image through every block (fake quantization, QDrop, the rounding regulariser) costs about
# this many float forward+backward passes of it: the slope between 50 and 150 (250) steps per block, CPU, measured
# on EfficientNet-Lite0 (1.35; 6.0 before, which made the W4A4 plans 2.6x too cautious) and ResNet-20 (1.31).
STEP_PASSES = 1.35


def cost(settings: ReconstructConfig, images: int, settings_of) -> float:
    """Float forward+backward passes of one image that reconstruction on ``images`` images costs
    (:mod:`hub_dfq.budget`): its steps, the two block streams, and the GPTQ start."""
    passes = STEP_PASSES * settings.iters * settings.batch_size + images
    if settings.init == "gptq":
        passes += gptq_cost(settings_of("gptq"), images)
    return passes


def run_reconstruct(context) -> dict[str, Any]:
    """The ``reconstruct`` algorithm (see :class:`hub_dfq.quant.algorithms.AlgorithmContext`)."""
    gptq = context.settings_of("gptq") if context.settings.init == "gptq" else None
    return {"blocks": reconstruct(context.module, context.node_blocks, context.data, context.settings, gptq=gptq,
                                  progress=context.progress, state=context.state)}
