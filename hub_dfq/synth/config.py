"""`SynthConfig`: every argument that decides which images a synthesis run produces.

The config is data: it is checked once here, stored in ``generation.json`` and compared on
``--resume``; two runs with equal configs on the same weights write byte-identical shards.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import InitVar, asdict, dataclass, field, fields, replace
from typing import Any

from ..deprecation import renamed_arguments
from ..errors import ConfigError
from ..runtime import fast_bf16
from .priors import NOISES
from .registry import BN_LOSSES, PRECISIONS, SYNTH_METHODS, SynthMethod

# why: planning 10^12 images (their shard names, their seeds) ran for ever before the first image: a typo, not a
# long run. ImageNet's training set is 1.3 million images. The CLI's numbers.MAX_IMAGES is the same bound.
MAX_IMAGES = 100_000_000

__all__ = ["SynthConfig", "Regularizers", "Priors"]


@dataclass(frozen=True)
class Regularizers:
    """What a method adds to its main loss term: image priors, augmentations and auxiliary loss weights.

    Args:
        tv_weight: weight of the (squared) total variation of the image (inception, bns+p); ``None``: the method's
            default (:attr:`~hub_dfq.synth.registry.SynthMethod.tv_weight`).
        l2_weight: weight of the mean squared input (inception).
        jitter: maximal random translation in pixels per step (inception); ``None`` picks
            1/16 of the image side.
        flip: random horizontal flips per step (inception).
        ce_weight: weight of the cross-entropy towards the target class (bns+i).
        noise: the noise the images start from: ``white`` (independent Gaussian values, the paper's) or ``pink``
            (photographs' 1/f spectrum and correlated colour channels, :func:`~hub_dfq.synth.priors.pink_noise`);
            ``None``: the method's default (:attr:`~hub_dfq.synth.registry.SynthMethod.noise`).
        warmup: deprecated here: the warm-up is :attr:`SynthConfig.warmup` (``Priors(warmup=...)`` and
            ``priors={"warmup": ...}`` still work, with a warning).
    """

    tv_weight: float | None = None
    l2_weight: float = 1e-3
    jitter: int | None = None
    flip: bool = True
    ce_weight: float = 0.5
    noise: str | None = None
    warmup: InitVar[float | None] = None

    def __post_init__(self, warmup: float | None) -> None:
        object.__setattr__(self, "_legacy_warmup", warmup)


# why: the class's name before issue 20 (it never held only image priors), still the name of the public
# `priors=` argument and of the "priors" mapping in generation.json; kept for users' code
Priors = Regularizers


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
        regularizers: image priors, augmentations and auxiliary loss weights (was ``priors``).
        warmup: fraction of the iterations with a linearly rising learning rate (then a cosine decay).

    ``to_dict`` keeps the layout of ``generation.json`` and of every cache key from before these names:
    ``regularizers`` and ``warmup`` are stored together as ``"priors"``.
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
    regularizers: Regularizers = field(default_factory=Regularizers)
    warmup: float = 0.05

    def __post_init__(self) -> None:
        self._absorb_legacy_warmup()
        method = SYNTH_METHODS.get(self.method)
        BN_LOSSES.get(self.loss)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if isinstance(self.num_images, bool) or not isinstance(self.num_images, int) or self.num_images <= 0:
            raise ConfigError(f"`num_images` must be a positive integer, got {self.num_images!r}")
        if self.num_images > MAX_IMAGES:
            raise ConfigError(f"`num_images` is {self.num_images:,}, more than hub-dfq generates ({MAX_IMAGES:,}): "
                              "ask for fewer images")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ConfigError(f"`batch_size` must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.shard_size, int) or self.shard_size <= 0:
            raise ConfigError(f"`shard_size` must be a positive integer, got {self.shard_size!r}")
        if self.iters is not None and (isinstance(self.iters, bool) or not isinstance(self.iters, int)
                                       or self.iters <= 0):  # why: methods that optimise nothing ignored it silently
            raise ConfigError(f"`iters` must be a positive integer, got {self.iters!r}")
        iters = method.iters if self.iters is None else self.iters
        lr = method.lr if self.lr is None else float(self.lr)
        if not method.optimised:
            iters, lr = 0, 0.0  # nothing is optimised
        elif isinstance(iters, bool) or not isinstance(iters, int) or iters <= 0:
            raise ConfigError(
                f"`iters` must be a positive integer for method {self.method!r}, got {iters!r}: with no optimisation "
                "step the images would be unoptimised noise under its name (use method 'gaussian' for noise)")
        if method.optimised and not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"`lr` (learning rate) must be a positive number, got {lr}")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"warm-up fraction must be in [0, 1), got {self.warmup}")
        batch = min(self.batch_size, self.num_images)  # a batch larger than the run is clamped, not refused
        shard = batch * math.ceil(min(self.shard_size, self.num_images) / batch)
        object.__setattr__(self, "iters", int(iters))
        object.__setattr__(self, "lr", lr)
        object.__setattr__(self, "batch_size", batch)
        object.__setattr__(self, "shard_size", shard)
        if self.precision == "auto":
            object.__setattr__(self, "precision", "bf16" if fast_bf16() else "fp32")
        if self.regularizers.tv_weight is None:
            object.__setattr__(self, "regularizers", replace(self.regularizers, tv_weight=method.tv_weight))
        elif not (math.isfinite(self.regularizers.tv_weight) and self.regularizers.tv_weight >= 0):
            raise ConfigError(f"`tv_weight` must be a number >= 0, got {self.regularizers.tv_weight}")
        if self.regularizers.noise is None:
            object.__setattr__(self, "regularizers", replace(self.regularizers, noise=method.noise))
        elif self.regularizers.noise not in NOISES:
            raise ConfigError(f"unknown noise {self.regularizers.noise!r}: use one of {', '.join(NOISES)}")

    def _absorb_legacy_warmup(self) -> None:
        """Take a warm-up given the old way, inside the regularizers (``Priors(warmup=...)``)."""
        legacy = getattr(self.regularizers, "_legacy_warmup", None)
        if legacy is None:
            return
        if self.warmup not in (legacy, _DEFAULT_WARMUP):
            raise ConfigError(f"the warm-up is given twice, {self.warmup} and {legacy} (in `priors`): pass only "
                              "`warmup`")
        warnings.warn("a `warmup` in `priors` is deprecated: pass `warmup` itself", FutureWarning, stacklevel=5)
        object.__setattr__(self, "warmup", legacy)
        object.__setattr__(self, "regularizers", replace(self.regularizers))

    @property
    def method_info(self) -> SynthMethod:
        """The method's descriptor (its registry entry)."""
        return SYNTH_METHODS.get(self.method)

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_images / self.shard_size)

    def shard_rows(self, index: int) -> range:
        """Global row indices of shard ``index``."""
        start = index * self.shard_size
        return range(start, min(start + self.shard_size, self.num_images))

    def to_dict(self) -> dict[str, Any]:
        """The stored form (``generation.json``, cache keys): the regularizers and the warm-up as ``"priors"``."""
        data = asdict(self)
        stored = {**data.pop("regularizers"), "warmup": data.pop("warmup")}
        if stored["noise"] == "white":  # the start of every run before `noise` existed: their keys stay as they were
            del stored["noise"]
        return {**data, "priors": stored}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SynthConfig":
        known = {f.name for f in fields(cls)} - {"regularizers", "warmup"}
        data = {("num_images" if k == "n" else k): v for k, v in data.items()}  # manifests before 0.2 said "n"
        values = {k: v for k, v in data.items() if k in known}
        stored = dict(data.get("priors", {}))
        stored.setdefault("noise", "white")  # not stored: white (see to_dict)
        return cls(**values, warmup=stored.pop("warmup", _DEFAULT_WARMUP), regularizers=Regularizers(**stored))


_DEFAULT_WARMUP = SynthConfig.warmup
# why: `priors` was the argument's name before issue 20 (the "priors" key of generation.json keeps it)
SynthConfig.__init__ = renamed_arguments(priors="regularizers")(SynthConfig.__init__)  # type: ignore[method-assign]
