"""The one deprecation helper: an old argument spelling keeps working and says which one replaces it."""

from __future__ import annotations

import warnings

__all__ = ["warn_deprecated"]


def warn_deprecated(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warn that ``old`` is deprecated in favour of ``new``.

    ``FutureWarning``, not ``DeprecationWarning``: Python shows it to users of a script, not only to tests. The
    default ``stacklevel`` points at the caller of the function that calls this one.
    """
    warnings.warn(f"`{old}` is deprecated: use `{new}`", FutureWarning, stacklevel=stacklevel + 1)
