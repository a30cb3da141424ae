"""One progress switch for every long job: ``progress=None`` shows bars on a terminal only."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

__all__ = ["progress_enabled", "progress_bar"]


def progress_enabled(progress: bool | None) -> bool:
    """``progress`` itself, or for ``None``: whether standard error is a terminal."""
    if progress is None:
        return sys.stderr.isatty()
    return bool(progress)


def progress_bar(*, progress: bool | None, total: int | None = None, desc: str = "", unit: str = "it",
                 **kwargs: Any) -> tqdm:
    """A tqdm bar (rate and ETA when ``total`` is known), disabled when :func:`progress_enabled` says so."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not progress_enabled(progress), dynamic_ncols=True,
                **kwargs)
