"""`SynthConfig`: every argument that decides which images a synthesis run produces.

The config is data: it is checked once here, stored in ``generation.json`` and compared on
``--resume``; two runs with equal configs on the same weights write byte-identical shards.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from ..errors import ConfigError

__all__ = ["SynthConfig", "METHODS", "LOSSES", "PRECISIONS", "DEFAULT_ITERS", "DEFAULT_LR"]

METHODS = ("gaussian", "inception", "bns", "bns+i")
BN_METHODS = ("bns", "bns+i")
LOSSES = ("kl", "l2")
PRECISIONS = ("auto", "fp32", "bf16")

# Iterations and Adam learning rates per method. The BNS defaults come from scripts/bench_synth.py:
# lr 1.0 with a short warm-up and a cosine decay reaches in 200 iterations the divergence a plain
# constant-lr-0.1 Adam loop has after 500.
DEFAULT_ITERS = {"gaussian": 0, "inception": 200, "bns": 200, "bns+i": 200}
DEFAULT_LR = {"gaussian": 0.0, "inception": 0.1, "bns": 1.0, "bns+i": 1.0}


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
        method: ``gaussian``, ``inception``, ``bns`` or ``bns+i``.
        n: number of images.
        iters: optimisation steps per batch (``None``: the method's default; 0 for gaussian).
        batch_size: images optimised together (clamped to ``n``). BN statistics are matched per batch.
        loss: BN loss, ``kl`` (the paper) or ``l2`` (ZeroQ); also the reported divergence.
        lr: Adam learning rate in the normalised input space (``None``: the method's default).
        seed: run seed; shard ``i`` is generated from ``(seed, i)`` alone.
        shard_size: rows per parquet shard (rounded up to a multiple of ``batch_size``).
        precision: ``fp32``, ``bf16`` (autocast for the forward/backward, float32 statistics,
            inputs and optimiser) or ``auto`` (bf16 where the hardware has fast bf16 matmuls).
        priors: image priors and auxiliary loss weights.
    """

    method: str = "bns"
    n: int = 256
    iters: int | None = None
    batch_size: int = 64
    loss: str = "kl"
    lr: float | None = None
    seed: int = 0
    shard_size: int = 1024
    precision: str = "auto"
    priors: Priors = field(default_factory=Priors)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}: use 'kl' (the paper's) or 'l2' (ZeroQ's)")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if not isinstance(self.n, int) or self.n <= 0:
            raise ConfigError(f"n (number of images) must be a positive integer, got {self.n!r}")
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ConfigError(f"batch size must be a positive integer, got {self.batch_size!r}")
        if self.shard_size <= 0:
            raise ConfigError(f"shard size must be positive, got {self.shard_size}")
        iters = DEFAULT_ITERS[self.method] if self.iters is None else self.iters
        lr = DEFAULT_LR[self.method] if self.lr is None else float(self.lr)
        if self.method == "gaussian":
            iters, lr = 0, 0.0  # nothing is optimised
        if iters < 0:
            raise ConfigError(f"iters must be >= 0, got {iters}")
        if self.method != "gaussian" and iters > 0 and not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"learning rate must be a positive number, got {lr}")
        if not 0.0 <= self.priors.warmup < 1.0:
            raise ConfigError(f"warm-up fraction must be in [0, 1), got {self.priors.warmup}")
        batch = min(self.batch_size, self.n)  # a batch larger than n is clamped, not refused
        shard = batch * math.ceil(min(self.shard_size, self.n) / batch)
        object.__setattr__(self, "iters", int(iters))
        object.__setattr__(self, "lr", lr)
        object.__setattr__(self, "batch_size", batch)
        object.__setattr__(self, "shard_size", shard)
        if self.precision == "auto":
            object.__setattr__(self, "precision", "bf16" if fast_bf16() else "fp32")

    @property
    def num_shards(self) -> int:
        return math.ceil(self.n / self.shard_size)

    def shard_rows(self, index: int) -> range:
        """Global row indices of shard ``index``."""
        start = index * self.shard_size
        return range(start, min(start + self.shard_size, self.n))

    @property
    def uses_bn(self) -> bool:
        return self.method in BN_METHODS

    @property
    def has_targets(self) -> bool:
        return self.method in ("inception", "bns+i")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SynthConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["priors"] = Priors(**data.get("priors", {}))
        return cls(**values)


def fast_bf16() -> bool:
    """Whether bf16 matmuls are natively fast here (CUDA, or a CPU with AVX512-BF16 / AMX)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        return False
    if capability not in ("AVX512", "AMX"):
        return False
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
