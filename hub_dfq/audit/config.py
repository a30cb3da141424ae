"""`AuditConfig`: every setting of an audit, in one place.

:func:`hub_dfq.audit` takes one (or fills one from its keyword arguments); the check that every process of a
launch was given the same arguments and the settings an ``audit.json`` records both read it. Where the audit runs
and writes (device, output folder, token, progress bars) stays with the verb: none of that changes a score, and a
token must never be written down.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from ..errors import ConfigError
from .registry import DIVERGENCES

__all__ = ["AuditConfig", "NEAR_BUDGET_GMACS", "REFERENCE_MODES"]

# The BNS near point is synthesised only below this cost (GMACs: 3 x images x iterations x MACs per image, a
# forward and a backward pass per step). 64 x 200 on the CIFAR ResNet-20 (0.04 GMACs/image) is ~1,600 GMACs,
# under a minute on one core; on EfficientNet-Lite0 at 224 px (0.4 GMACs/image) it is ~15,000 GMACs, ~13 minutes
# on two cores, and a run cut to fit five minutes (16 images x 80 steps) is still at a third of the noise
# divergence in log terms: no anchor. Above the budget the audit uses the one-point scale against noise.
NEAR_BUDGET_GMACS = 4000.0
REFERENCE_MODES = ("auto", "gaussian", "none")


def _setting(default: Any, *, reported: bool) -> Any:
    # `reported`: recorded among the settings of audit.json (the others never were; its bytes stay put)
    return field(default=default, metadata={"reported": reported})


@dataclass(frozen=True)
class AuditConfig:
    """The settings of one audit (:func:`hub_dfq.audit` takes them as one config or as keywords).

    Args:
        limit: audit only the first ``limit`` images of each candidate.
        batch_size: images per forward pass.
        score_batch: images per batch-level score (the bootstrap resamples single images).
        metric: the main divergence, ``"kl"`` (the paper's), ``"symmetric_kl"``, ``"reverse_kl"`` or ``"w2"`` (or
            another registered one); all are reported per layer.
        references: ``"auto"`` (Gaussian noise as "far", BNS synthetic data as "near"), ``"gaussian"`` (noise
            only: one-point scale ``log10(far / d) / 3``), ``"none"``, or a mapping ``{"far": d, "near": d}`` of
            known reference divergences.
        reference_images: images per reference point.
        reference_iters: BNS optimisation steps per batch of the near reference (``iters`` of
            :func:`hub_dfq.synthesize`).
        bootstrap: bootstrap replicates (Poisson weights per image) of the bias-corrected divergence and its 95%
            interval (0: the plug-in divergence and no interval).
        seed: seed of the reference points and the bootstrap.
        split: dataset split (default: test, then validation, then train).
        reference_budget_gmacs: with ``references="auto"``, synthesise the near reference only when it costs at
            most this many GMACs (3 x images x iterations x MACs per image; ``None``: always). Above it
            (EfficientNet-Lite0 at 224 px with the defaults) the near point is skipped, the report says why, and
            similarity uses the one-point scale against noise.
        image_column: column holding the images (auto-detected).
        streaming: stream Hub datasets instead of downloading them.
        cache: read and write reference points in :func:`hub_dfq.audit.references.reference_cache_dir`.

    Raises:
        ConfigError: a value out of range or an unknown metric or reference mode.

    Example:
        >>> config = AuditConfig(limit=500, references="gaussian")
        >>> AuditConfig.from_dict(config.to_dict()) == config
        True
    """

    limit: int | None = _setting(None, reported=True)
    batch_size: int = _setting(64, reported=True)
    score_batch: int = _setting(64, reported=True)
    metric: str = _setting("kl", reported=True)
    references: str | Mapping[str, float] = _setting("auto", reported=True)
    reference_images: int = _setting(64, reported=True)
    reference_iters: int = _setting(200, reported=False)
    bootstrap: int = _setting(200, reported=True)
    seed: int = _setting(0, reported=True)
    split: str | None = _setting(None, reported=True)
    reference_budget_gmacs: float | None = _setting(NEAR_BUDGET_GMACS, reported=True)
    image_column: str | None = _setting(None, reported=False)
    streaming: bool = _setting(False, reported=False)
    cache: bool = _setting(True, reported=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.score_batch < 1:
            raise ConfigError(f"batch sizes must be positive, got batch_size={self.batch_size}, "
                              f"score_batch={self.score_batch}")
        DIVERGENCES.get(self.metric)
        if self.bootstrap < 0 or self.reference_images < 1 or self.reference_iters < 1:
            raise ConfigError("`bootstrap` must be >= 0, `reference_images` and `reference_iters` >= 1; got "
                              f"{self.bootstrap}, {self.reference_images}, {self.reference_iters}")
        if isinstance(self.references, Mapping):
            object.__setattr__(self, "references", dict(self.references))  # the caller's dict may change later
        elif self.references not in REFERENCE_MODES:
            raise ConfigError(f"references must be one of {list(REFERENCE_MODES)} or a mapping "
                              f"{{'far': .., 'near': ..}}, got {self.references!r}")

    def replace(self, **changes: Any) -> "AuditConfig":
        """A copy with ``changes`` (checked like a new config).

        Raises:
            TypeError: a name that is no setting.
        """
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(f"unknown audit setting(s) {unknown}; the settings are {[f.name for f in fields(self)]}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every setting as JSON-able data, in field order."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AuditConfig":
        """Read :meth:`to_dict`'s output (missing keys take their defaults).

        Raises:
            ConfigError: an unknown key, or a value out of range.
        """
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown audit setting(s) {unknown}; known: {[f.name for f in fields(cls)]}")
        return cls(**data)

    def reported(self, *, normalisation: str | None) -> dict[str, Any]:
        """The settings ``audit.json`` records: the reported fields, a given reference mapping as ``"given"``, and
        the similarity normalisation the audit chose."""
        recorded = {name: value for name, value in self.to_dict().items()
                    if self.__dataclass_fields__[name].metadata["reported"]}
        if not isinstance(self.references, str):
            recorded["references"] = "given"
        budget = recorded.pop("reference_budget_gmacs")  # audit.json has always listed it after the normalisation
        return {**recorded, "normalisation": normalisation, "reference_budget_gmacs": budget}
