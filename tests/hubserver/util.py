"""Small helpers shared by the endpoint modules."""

from __future__ import annotations

from urllib.parse import unquote

TYPE_FROM_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
TYPE_FROM_URL_PREFIX = {"datasets": "dataset", "spaces": "space", None: "model"}


def truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


def split_rev(rest: str) -> tuple[str, str]:
    """Split `<rev>/<path>` of a raw (percent-encoded) URL tail. `refs/pr/1` may come quoted or not."""
    segs = rest.split("/")
    if segs[0] == "refs" and len(segs) >= 3:
        return "/".join(segs[:3]), unquote("/".join(segs[3:]))
    return unquote(segs[0]), unquote("/".join(segs[1:]))
