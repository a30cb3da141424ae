"""`SynthConfig`: every argument that decides which images a synthesis run produces.

The config is data: it is checked once here, stored in ``generation.json`` and compared on
``--resume``; two runs with equal configs on the same weights write byte-identical shards.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import ConfigError
from ..runtime import fast_bf16
from .registry import BN_LOSSES, PRECISIONS, SYNTH_METHODS, SynthMethod

__all__ = ["SynthConfig", "Priors"]


@dataclass(frozen=True)
class Priors:
    """Image priors and auxiliary loss weights.

    Args:
        tv_weight: weight of the (squared) total variation of the image (inception).
        l2_weight: weight of the mean squared input (inception).
        jitter: maximal random translation in pixels per step (inception); ``None`` picks
            1/16 of the image side.
        flip: random horizontal flips per step (inception).
        ce_weight: weight of the cross-entropy towards the target class (bns+i).
        warmup: fraction of the iterations with a linearly rising learning rate.
    """

    tv_weight: float = 0.05
    l2_weight: float = 1e-3
    jitter: int | None = None
    flip: bool = True
    ce_weight: float = 0.5
    warmup: float = 0.05


@dataclass(frozen=True)
class SynthConfig:
    """Arguments of one synthesis run (see :func:`hub_dfq.synthesize`).

    Args:
        method: a registered synthesis method (``gaussian``, ``inception``, ``bns``, ``bns+i``, ...).
        num_images: number of images.
        iters: optimisation steps per batch (``None``: the method's default; 0 for methods that
            optimise nothing).
        batch_size: images optimised together (clamped to ``num_images``). BN statistics are matched per batch.
        loss: BN loss optimised: ``rkl`` (default: the reverse KL with the layer's own BN eps, well-conditioned
            where a batch leaves a channel nearly dead; ``scripts/bench_bn_loss.py``), ``kl`` (the paper's) or
            ``l2`` (ZeroQ); datasets report the paper's KL for both KL losses.
        lr: Adam learning rate in the normalised input space (``None``: the method's default).
        seed: run seed; shard ``i`` is generated from ``(seed, i)`` alone.
        shard_size: rows per parquet shard (rounded up to a multiple of ``batch_size``).
        precision: ``fp32``, ``bf16`` (autocast for the forward/backward, float32 statistics,
            inputs and optimiser) or ``auto`` (bf16 where the hardware has fast bf16 matmuls).
        priors: image priors and auxiliary loss weights.
    """

    method: str = "bns"
    num_images: int = 256
    iters: int | None = None
    batch_size: int = 64
    loss: str = "rkl"
    lr: float | None = None
    seed: int = 0
    shard_size: int = 1024
    precision: str = "auto"
    priors: Priors = field(default_factory=Priors)

    def __post_init__(self) -> None:
        spec = SYNTH_METHODS.get(self.method)
        BN_LOSSES.get(self.loss)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if isinstance(self.num_images, bool) or not isinstance(self.num_images, int) or self.num_images <= 0:
            raise ConfigError(f"`num_images` must be a positive integer, got {self.num_images!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ConfigError(f"`batch_size` must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.shard_size, int) or self.shard_size <= 0:
            raise ConfigError(f"`shard_size` must be a positive integer, got {self.shard_size!r}")
        iters = spec.iters if self.iters is None else self.iters
        lr = spec.lr if self.lr is None else float(self.lr)
        if not spec.optimised:
            iters, lr = 0, 0.0  # nothing is optimised
        elif isinstance(iters, bool) or not isinstance(iters, int) or iters <= 0:
            raise ConfigError(
                f"`iters` must be a positive integer for method {self.method!r}, got {iters!r}: with no optimisation "
                "step the images would be unoptimised noise under its name (use method 'gaussian' for noise)")
        if spec.optimised and not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"`lr` (learning rate) must be a positive number, got {lr}")
        if not 0.0 <= self.priors.warmup < 1.0:
            raise ConfigError(f"warm-up fraction must be in [0, 1), got {self.priors.warmup}")
        batch = min(self.batch_size, self.num_images)  # a batch larger than the run is clamped, not refused
        shard = batch * math.ceil(min(self.shard_size, self.num_images) / batch)
        object.__setattr__(self, "iters", int(iters))
        object.__setattr__(self, "lr", lr)
        object.__setattr__(self, "batch_size", batch)
        object.__setattr__(self, "shard_size", shard)
        if self.precision == "auto":
            object.__setattr__(self, "precision", "bf16" if fast_bf16() else "fp32")

    @property
    def spec(self) -> SynthMethod:
        """The method's descriptor."""
        return SYNTH_METHODS.get(self.method)

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_images / self.shard_size)

    def shard_rows(self, index: int) -> range:
        """Global row indices of shard ``index``."""
        start = index * self.shard_size
        return range(start, min(start + self.shard_size, self.num_images))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SynthConfig":
        known = {f.name for f in fields(cls)}
        data = {("num_images" if k == "n" else k): v for k, v in data.items()}  # manifests before 0.2 said "n"
        values = {k: v for k, v in data.items() if k in known}
        values["priors"] = Priors(**data.get("priors", {}))
        return cls(**values)
