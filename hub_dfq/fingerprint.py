"""One fingerprint for everything hub-dfq caches or resumes: a hash of what made a result.

Synthetic datasets, audit reference points and saved quantization progress are keyed on
:func:`fingerprint` of their inputs (weights, arguments, data) together with the version of the
algorithm that produced them and where it ran (precision and device type): a bug fix that changes
output bytes bumps the version, and another machine with another precision gets its own entry,
instead of silently reusing old results. The fingerprint is also recorded next to the result
(``generation.json``, the model card).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

__all__ = ["fingerprint", "weights_sha256", "tensor_digest"]


def _update(digest: "hashlib._Hash", value: Any) -> None:
    if isinstance(value, nn.Module):
        value = value.state_dict()
    if isinstance(value, torch.Tensor):
        digest.update(b"T")
        tensor_digest(value, digest)
    elif isinstance(value, dict):
        digest.update(b"{")
        for key in sorted(value, key=str):
            digest.update(json.dumps(str(key)).encode())
            _update(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _update(digest, item)
        digest.update(b"]")
    else:
        digest.update(json.dumps(value, sort_keys=True, default=str).encode())


def tensor_digest(tensor: torch.Tensor, digest: "hashlib._Hash | None" = None) -> "hashlib._Hash":
    """Feed dtype, shape and the raw bytes of ``tensor`` into ``digest`` (a new sha256 if ``None``)."""
    digest = digest or hashlib.sha256()
    t = tensor.detach().cpu().contiguous()
    digest.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest


def fingerprint(kind: str, *, version: int, length: int = 24, **parts: Any) -> str:
    """Hex digest identifying a result of ``kind`` made by algorithm ``version`` from ``parts``.

    Args:
        kind: what is fingerprinted (``"synth"``, ``"audit-reference"``, ``"quantize"``); results of
            different kinds never share a key.
        version: version of the algorithm that makes the result; bump it whenever its output bytes change.
        length: hex characters kept.
        **parts: everything else that determines the result: tensors and modules (hashed by content),
            and JSON-able values (arguments, the precision and device type actually used).

    Example:
        >>> fingerprint("synth", version=2, arguments={"n": 8}, precision="fp32") == \\
        ...     fingerprint("synth", version=2, precision="fp32", arguments={"n": 8})
        True
    """
    digest = hashlib.sha256()
    _update(digest, {"kind": kind, "version": int(version), "parts": parts})
    return digest.hexdigest()[:length]


def weights_sha256(module: nn.Module) -> str:
    """Hash of a module's state dict (names, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}|".encode())
        tensor_digest(tensor, digest)
    return digest.hexdigest()
