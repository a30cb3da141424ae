"""What an audit measured: one :class:`CandidateResult` per dataset and the :class:`AuditReport` around them."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .report import write_report

__all__ = ["CandidateResult", "AuditReport"]


@dataclass
class CandidateResult:
    """Audit of one dataset (or reference). ``divergence`` is ``None`` when no image was readable.

    ``divergence`` is the bias-corrected estimate and ``ci`` its interval (both from the bootstrap,
    :func:`~hub_dfq.audit.scores.bootstrap_estimate`; with ``bootstrap=0`` the plug-in value and no
    interval); ``divergences`` and ``layers`` are plug-in values of the pooled moments.
    """

    dataset: str
    n_images: int
    n_skipped: int
    divergence: float | None
    divergences: dict[str, float | None]
    ci: tuple[float, float] | None
    layers: dict[str, float]
    layers_detail: dict[str, dict[str, float]]
    batch_scores: list[float]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    similarity: float | None = None
    similarity_ci: tuple[float, float] | None = None
    rank: int | None = None
    split: str | None = None
    # the pooled-moment divergence before the bootstrap's bias correction (``divergence`` without a bootstrap)
    divergence_plugin: float | None = None
    # the per-image view: quantiles of the images' own scores and the most atypical rows (hub_dfq.score_images)
    image_scores: dict[str, Any] | None = None

    @property
    def batch_summary(self) -> dict[str, float | int] | None:
        """Mean, spread and quantiles of the batch-level scores."""
        if not self.batch_scores:
            return None
        t = torch.tensor(self.batch_scores, dtype=torch.float64)
        q = torch.quantile(t, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
        return {"n": len(self.batch_scores), "mean": t.mean().item(),
                "std": t.std().item() if len(t) > 1 else 0.0, "min": t.min().item(), "p05": q[0],
                "median": q[1], "p95": q[2], "max": t.max().item()}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ci"] = list(self.ci) if self.ci else None
        data["similarity_ci"] = list(self.similarity_ci) if self.similarity_ci else None
        data["batch_summary"] = self.batch_summary
        return data


@dataclass
class AuditReport:
    """Everything an audit measured; :meth:`save` writes ``audit.json``, ``audit.md`` and a plot."""

    model: dict[str, Any]
    settings: dict[str, Any]
    references: dict[str, Any]
    candidates: list[CandidateResult]

    def ranking(self) -> list[CandidateResult]:
        """Candidates from most to least similar (unscorable ones left out)."""
        return sorted((c for c in self.candidates if c.rank is not None), key=lambda c: c.rank)

    def __getitem__(self, dataset: str) -> CandidateResult:
        for c in self.candidates:
            if c.dataset == dataset:
                return c
        raise KeyError(f"no candidate {dataset!r}; candidates are {[c.dataset for c in self.candidates]}")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "settings": self.settings, "references": self.references,
                "ranking": [c.dataset for c in self.ranking()],
                "candidates": [c.to_dict() for c in self.candidates]}

    def save(self, out_dir: str | os.PathLike[str], *, plot: bool = True, overwrite: bool = False) -> dict[str, str]:
        """Write the report folder ``out_dir`` (see :func:`~hub_dfq.audit.report.write_report`); returns the paths."""
        return write_report(self, out_dir, plot=plot, overwrite=overwrite)
