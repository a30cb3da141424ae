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
from typing import Any, Iterator

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from ..errors import ConfigError, DivergedError
from ..progress import progress_enabled
from .calibrate import act_quantizers, quant_layers, quant_mode
from .resume import RunState, load_quantizer_state, quantizer_state

logger = logging.getLogger(__name__)

__all__ = ["ReconstructConfig", "Block", "partition", "reconstruct", "run_blocks"]


@dataclass(frozen=True)
class ReconstructConfig:
    """Settings of block reconstruction.

    Args:
        iters: optimisation steps per block.
        batch_size: calibration images per step.
        lr_round: Adam learning rate of the rounding variables.
        lr_act: Adam learning rate of the activation step sizes.
        round_weight: weight of the rounding regulariser.
        warmup: fraction of the steps without the regulariser.
        beta: start and end of the regulariser's annealed exponent.
        drop_prob: QDrop probability of keeping an activation unquantized while fitting.
        seed: seed of batch sampling and QDrop.
    """

    iters: int = 300
    batch_size: int = 32
    lr_round: float = 1e-1
    lr_act: float = 1e-3
    round_weight: float = 0.01
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    drop_prob: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iters <= 0 or self.batch_size <= 0:
            raise ConfigError(f"reconstruction needs `iters` > 0 and `batch_size` > 0, got {self.iters}, "
                              f"{self.batch_size}: with no step the model is only calibrated (use algorithm "
                              "'calibrate' for that)")
        if not 0.0 <= self.drop_prob < 1.0 or not 0.0 <= self.warmup < 1.0:
            raise ConfigError("drop_prob and warmup must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Block:
    """A contiguous piece of the graph, runnable on its own."""

    name: str
    module: fx.GraphModule
    inputs: list[str]
    outputs: list[str]


def partition(gm: fx.GraphModule, node_blocks: dict[str, str]) -> list[Block]:
    """Cut ``gm`` into blocks at the model's block boundaries; blocks without weights join the previous one."""
    groups: list[tuple[str, list[fx.Node]]] = []
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        block = node_blocks.get(node.name)
        if not groups or (block is not None and block != groups[-1][0] and node.op != "placeholder"):
            groups.append((block or "", [node]))
        else:
            groups[-1][1].append(node)

    def has_weights(nodes: list[fx.Node]) -> bool:
        return any(n.op == "call_module" and hasattr(modules.get(n.target), "weight_quantizer") for n in nodes)

    merged: list[tuple[str, list[fx.Node]]] = []
    for name, nodes in groups:
        if merged and not has_weights(nodes):
            merged[-1][1].extend(nodes)
        elif merged and not has_weights(merged[-1][1]):
            merged[-1] = (name, merged[-1][1] + nodes)
        else:
            merged.append((name, nodes))
    return [_subgraph(gm, name, nodes) for name, nodes in merged]


def _subgraph(gm: fx.GraphModule, name: str, nodes: list[fx.Node]) -> Block:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inside = set(nodes)
    inputs: list[str] = []
    for node in nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name)
            inputs.append(node.name)
            continue
        for arg in node.all_input_nodes:
            if arg not in inside and arg not in env:
                env[arg] = graph.placeholder(arg.name)
                inputs.append(arg.name)
        env[node] = graph.node_copy(node, lambda a: env[a])
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    graph.output(tuple(env[n] for n in outputs))
    # GraphModule copies submodule *references* from gm: fitting a block updates the model itself.
    return Block(name, fx.GraphModule(gm, graph, f"Block_{name}"), inputs, [n.name for n in outputs])


def _device(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


@torch.no_grad()
def _run(block: Block, env: dict[str, torch.Tensor], batch_size: int) -> dict[str, torch.Tensor]:
    n = len(next(iter(env.values())))
    device = _device(block.module)
    chunks: list[list[torch.Tensor]] = [[] for _ in block.outputs]
    for start in range(0, n, batch_size):
        out = block.module(*(env[i][start:start + batch_size].to(device) for i in block.inputs))
        for slot, value in zip(chunks, out):
            slot.append(value.cpu())
    return {name: torch.cat(slot) for name, slot in zip(block.outputs, chunks)}


def run_blocks(blocks: list[Block], data: torch.Tensor, batch_size: int = 128) -> Iterator[tuple[Block, dict, dict]]:
    """Yield ``(block, inputs, outputs)`` running ``data`` through the blocks in order (as they are now)."""
    env = {blocks[0].inputs[0]: data}
    for block in blocks:
        inputs = {k: env[k] for k in block.inputs}
        outputs = _run(block, env, batch_size)
        env.update(outputs)
        yield block, inputs, outputs


def _rec_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # BRECQ's reconstruction loss: squared error summed over channels, averaged over the rest.
    diff = (pred - target).square()
    return diff.sum(dim=1).mean() if diff.dim() > 1 else diff.mean()


def _fit_block(block: Block, inputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
               cfg: ReconstructConfig, generator: torch.Generator, progress: bool) -> float:
    layers = [m for _, m in quant_layers(block.module) if not m.weight_quantizer.frozen]
    acts = [q for _, q in act_quantizers(block.module) if q.mode == "quant"]
    if cfg.iters == 0 or not (layers or acts):
        return float("nan")
    for layer in layers:
        layer.weight_quantizer.init_adaround(layer.weight)
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
    optimizer = torch.optim.Adam(groups)
    # Rounding variables keep a constant rate: the regulariser is strongest at the end (small beta)
    # and must still be able to push them to 0 or 1. Step sizes follow a cosine decay.
    cosine = lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, cfg.iters) / cfg.iters))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [(lambda step: 1.0) if layers and i == 0 else cosine for i in range(len(groups))])
    n = len(next(iter(inputs.values())))
    device = _device(block.module)
    warm = int(cfg.warmup * cfg.iters)
    rec = torch.zeros(())
    bar = tqdm(range(cfg.iters), desc=f"reconstruct {block.name}", disable=not progress_enabled(progress), leave=False)
    try:
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
        for q in acts:
            q.scale.requires_grad_(False)
            with torch.no_grad():
                q.scale.abs_().clamp_min_(1e-8)
            q.drop_prob = 0.0
            q.eval()
    return float(rec.detach())


def reconstruct(gm: fx.GraphModule, node_blocks: dict[str, str], data: torch.Tensor, cfg: ReconstructConfig, *,
                progress: bool | None = None, state: RunState | None = None) -> list[dict[str, Any]]:
    """Fit every block of a calibrated model, in order, to its full-precision output on ``data``.

    Args:
        gm: a prepared and calibrated model (modified in place; its weights end up frozen).
        node_blocks: block of every node (from :func:`~hub_dfq.quant.prepare.prepare`).
        data: normalised calibration inputs.
        cfg: reconstruction settings.
        progress: show progress bars.
        state: where to save progress after every block and resume from (the same bytes as one run).

    Returns:
        One record per block: name, loss before and after fitting (on the calibration data).
    """
    blocks = partition(gm, node_blocks)
    generator = torch.Generator().manual_seed(cfg.seed)
    records: list[dict[str, Any]] = []
    fp_env = {blocks[0].inputs[0]: data}
    q_env = {blocks[0].inputs[0]: data}
    remaining_uses = _uses(blocks)
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
            with quant_mode(block.module, enabled=False):
                targets = _run(block, fp_env, 128)
            fit = index >= done  # earlier blocks were fitted by the interrupted run: only replayed
            if fit:
                inputs = {k: q_env[k] for k in block.inputs}
                before = _loss_on(block, q_env, targets)
                final = _fit_block(block, inputs, targets, cfg, generator, progress)
            outputs = _run(block, q_env, 128)
            if fit:
                after = sum(float(_rec_loss(outputs[k], targets[k])) for k in block.outputs)
                records.append({"block": block.name, "loss_before": before, "loss_after": after, "train_loss": final})
                logger.info("block %s: reconstruction loss %.4g -> %.4g", block.name, before, after)
                if state is not None:
                    state.save("reconstruct", {"module": quantizer_state(gm), "generator": generator.get_state(),
                                               "torch_rng": torch.get_rng_state(), "records": records,
                                               "blocks_done": index + 1})
            fp_env.update(targets)
            q_env.update(outputs)
            for name in list(fp_env):  # free what no later block reads
                if remaining_uses.get(name, 0) <= index:
                    fp_env.pop(name, None)
                    q_env.pop(name, None)
    return records


def _uses(blocks: list[Block]) -> dict[str, int]:
    """Index of the last block reading each value."""
    last: dict[str, int] = {}
    for i, block in enumerate(blocks):
        for name in block.inputs:
            last[name] = i
    return last


@torch.no_grad()
def _loss_on(block: Block, env: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> float:
    outputs = _run(block, env, 128)
    return sum(float(_rec_loss(outputs[k], targets[k])) for k in block.outputs)


def run_reconstruct(context) -> dict[str, Any]:
    """The ``reconstruct`` algorithm (see :class:`hub_dfq.quant.algorithms.AlgorithmContext`)."""
    return {"blocks": reconstruct(context.module, context.node_blocks, context.data, context.settings,
                                  progress=context.progress, state=context.state)}
