"""BN-statistics audits: how close are candidate datasets to what a model was trained on?

    import hub_dfq
    report = hub_dfq.audit("default", {"mine": "parquet:photos.parquet", "theirs": "ORG/NAME"}, limit=2000)
    report.ranking()[0].dataset, report["mine"].similarity
    report.save("audit_out")          # audit.json, audit.md, audit_layers.png
"""

from importlib import resources
from pathlib import Path

from .core import AuditReport, CandidateResult, audit, measure_data, measure_tensors
from .references import cache_dir
from .scores import METRICS, auroc, similarity

__all__ = ["AuditReport", "CandidateResult", "METRICS", "audit", "auroc", "cache_dir", "measure_data",
           "measure_tensors", "measurement_path", "similarity"]


def measurement_path() -> str:
    """Folder of the ``evaluate`` measurement shipped with hub-dfq: ``evaluate.load(measurement_path())``."""
    return str(Path(str(resources.files("hub_dfq") / "measurements" / "bn_similarity")))
