"""A prepared graph cut into blocks, and the calibration data walked through them block by block.

Block-wise algorithms (GPTQ, reconstruction) fit one block at a time: a residual block, the stem, the
classifier. Each block is a small ``GraphModule`` sharing its submodules with the model, so what an
algorithm changes in a block changes the model. :class:`BlockWalk` keeps two streams of values, the
full-precision model's and the quantized model's, and frees each value once no later block reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import fx, nn

from .calibrate import quant_mode
from .modules import QuantModule

__all__ = ["Block", "partition", "run_block", "run_blocks", "BlockWalk"]


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
        return any(n.op == "call_module" and isinstance(modules.get(n.target), QuantModule) for n in nodes)

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


def module_device(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


@torch.no_grad()
def run_block(block: Block, env: dict[str, torch.Tensor], batch_size: int = 128) -> dict[str, torch.Tensor]:
    """``block``'s outputs (on the CPU) for the inputs in ``env``, in batches."""
    n = len(next(iter(env.values())))
    device = module_device(block.module)
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
        outputs = run_block(block, env, batch_size)
        env.update(outputs)
        yield block, inputs, outputs


class BlockWalk:
    """The calibration data through the blocks, full precision and quantized side by side.

    For each block in turn: :meth:`targets` is the full-precision block's output on the full-precision
    stream (computed before anything of the block changes), :meth:`inputs` the quantized stream's values the
    block reads; after fitting, :meth:`advance` runs the block as it is now on the quantized stream.
    """

    def __init__(self, blocks: list[Block], data: torch.Tensor, *, batch_size: int = 128):
        self.blocks = blocks
        self.batch_size = batch_size
        self.fp_env = {blocks[0].inputs[0]: data}
        self.q_env = {blocks[0].inputs[0]: data}
        self._last_use: dict[str, int] = {}
        for i, block in enumerate(blocks):
            for name in block.inputs:
                self._last_use[name] = i

    def targets(self, block: Block) -> dict[str, torch.Tensor]:
        with quant_mode(block.module, enabled=False):
            return run_block(block, self.fp_env, self.batch_size)

    def inputs(self, block: Block) -> dict[str, torch.Tensor]:
        return {k: self.q_env[k] for k in block.inputs}

    def advance(self, index: int, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run block ``index`` on the quantized stream, keep both streams' outputs, free what no later block reads."""
        outputs = run_block(self.blocks[index], self.q_env, self.batch_size)
        self.fp_env.update(targets)
        self.q_env.update(outputs)
        for name in set(self.fp_env) | set(self.q_env):
            if self._last_use.get(name, 0) <= index:
                self.fp_env.pop(name, None)
                self.q_env.pop(name, None)
        return outputs
