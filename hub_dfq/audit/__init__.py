"""BN-statistics audits: how close are candidate datasets to what a model was trained on?

    import hub_dfq
    report = hub_dfq.audit("default", {"mine": "parquet:photos.parquet", "theirs": "ORG/NAME"}, limit=2000)
    report.ranking()[0].dataset, report["mine"].similarity
    report.save("audit_out")          # audit.json, audit.md, audit_layers.png

``core`` streams data and has :func:`~hub_dfq.audit.core.audit`; ``moments`` accumulates BN-input
moments; ``scores`` turns them into divergences, intervals and similarities; ``registry`` lists the
divergences; ``references`` measures the reference points; ``results`` and ``report`` hold and write
what was measured. Nothing heavy is imported here.
"""

from importlib import resources
from pathlib import Path

__all__ = ["measurement_path"]


def measurement_path() -> str:
    """Folder of the ``evaluate`` measurement shipped with hub-dfq: ``evaluate.load(measurement_path())``."""
    return str(Path(str(resources.files("hub_dfq") / "measurements" / "bn_similarity")))
