"""The inference backends: one descriptor each, and the registry ``hub-dfq export`` and checkpoints read.

A new backend is one module (an ``export(qmodel, path)`` written against the public integer-state
API of :class:`~hub_dfq.quant.model.QuantizedModel`, and a ``load(path)`` returning a callable
classifier) plus one :func:`register_backend` call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..registry import Registry

__all__ = ["Backend", "BACKENDS", "register_backend"]


@dataclass(frozen=True)
class Backend:
    """One integer inference backend.

    Args:
        name: what users type (``--backend NAME``).
        summary: one line for the CLI help and the docs table.
        file_name: the file it adds to a checkpoint folder.
        export: ``(qmodel, path) -> path``, or its ``"module:attribute"`` path.
        load: ``(path) -> classifier`` (a callable from normalised pixels to logits), or its path.
        requires: the extra to install (``pip install 'hub-dfq[EXTRA]'``), if any.
        max_bits: the widest integers its kernels take.
    """

    name: str
    summary: str
    file_name: str
    export: Callable[..., Any] | str
    load: Callable[..., Any] | str
    requires: str | None = None
    max_bits: int = 8


BACKENDS: Registry[Backend] = Registry("backend", "backend")


def register_backend(backend: Backend, *, overwrite: bool = False) -> Backend:
    """Add an inference backend (see :class:`Backend`)."""
    return BACKENDS.register(backend, overwrite=overwrite)


register_backend(Backend(
    "onnx", summary="an ONNX QDQ graph that ONNX Runtime runs with int8 kernels (QLinearConv, QGemm, QLinearAdd)",
    file_name="model.onnx", export="hub_dfq.backends.onnx:export_onnx", load="hub_dfq.backends.onnx:load_onnx",
    requires="onnx"))
