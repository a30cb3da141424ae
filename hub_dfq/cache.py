"""Where hub-dfq caches what it can recompute (synthetic datasets, audit reference points)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root(kind: str) -> Path:
    """Cache folder for ``kind``: ``$HUB_DFQ_CACHE/KIND``, else ``$HF_HOME/hub_dfq/KIND``, else
    ``$XDG_CACHE_HOME/hub_dfq/KIND``, else ``~/.cache/hub_dfq/KIND``."""
    if os.environ.get("HUB_DFQ_CACHE"):
        return Path(os.environ["HUB_DFQ_CACHE"]).expanduser() / kind
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub_dfq" / kind
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "hub_dfq" / kind
