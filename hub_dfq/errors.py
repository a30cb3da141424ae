"""Every error hub-dfq raises on purpose.

Each class also inherits the builtin it stands for, so callers can catch either. Messages name the
offending value and say what to do instead; the CLI prints them as one line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

#: Every hub-dfq error class by its path (``"hub_dfq.errors.ConfigError"``), filled as the classes are defined:
#: the one table through which an error raised in one process is raised again, as the same class, in another.
ERROR_TYPES: dict[str, type[Exception]] = {}

# Python's own errors that cross processes as themselves (any other exception becomes a DistributedError).
_PYTHON_ERRORS = (ValueError, TypeError, KeyError, IndexError, LookupError, RuntimeError, NotImplementedError,
                  OSError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                  NotADirectoryError, TimeoutError, FloatingPointError, ZeroDivisionError, ArithmeticError,
                  AttributeError, ImportError, ModuleNotFoundError, MemoryError, AssertionError)


class HubDfqError(Exception):
    """Base class of every error hub-dfq raises deliberately."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__module__ == __name__:  # this module's classes only: a subclass elsewhere crosses as its base
            ERROR_TYPES[_path(cls)] = cls


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


ERROR_TYPES[_path(HubDfqError)] = HubDfqError
ERROR_TYPES.update({_path(cls): cls for cls in _PYTHON_ERRORS})


class ModelSpecError(HubDfqError, ValueError):
    """A model spec that no adapter understands."""


class ModelNotFoundError(HubDfqError, FileNotFoundError):
    """A model folder, file or Hub repository that does not exist or cannot be reached."""


class UnsafeCheckpointError(HubDfqError, RuntimeError):
    """A checkpoint that could only be read by unpickling arbitrary code."""


class UnsupportedModelError(HubDfqError, ValueError):
    """A model that is not an image classifier, or lacks what a stage needs (e.g. BatchNorm)."""


class DatasetError(HubDfqError, ValueError):
    """A dataset spec, split or column that cannot be used."""


class ImageDecodeError(HubDfqError, ValueError):
    """One image that cannot be decoded."""


class ConfigError(HubDfqError, ValueError):
    """An argument or configuration value out of range."""


class OutputExistsError(HubDfqError, FileExistsError):
    """An output location that holds another run's results, files hub-dfq did not write, or a file of the wrong kind."""


class UnsafeOutputError(HubDfqError, ValueError):
    """An output location hub-dfq never writes or replaces: the current folder, a parent of it, the home folder, a
    filesystem root or a symbolic link."""


class OutputWriteError(HubDfqError, OSError):
    """An output that cannot be written (read-only location, disk full, permissions); what existed before is intact."""


class OutputLockedError(HubDfqError, RuntimeError):
    """An output or cache entry that another running hub-dfq process is writing (the message names the process)."""


class DivergedError(HubDfqError, FloatingPointError):
    """An optimisation that produced NaN or Inf."""


class CheckpointError(HubDfqError, ValueError):
    """A saved checkpoint or weights file that is corrupted, truncated, does not fit its architecture, or is from a
    newer hub-dfq."""


class PublishError(HubDfqError, RuntimeError):
    """An upload to the Hub that failed; the local files are untouched."""


class ArgumentTypeError(HubDfqError, TypeError):
    """An argument of the wrong kind, e.g. a float model where a quantized one is needed."""


class DependencyError(HubDfqError, ImportError):
    """An optional dependency a feature needs is not installed (the message names the extra)."""


class DistributedError(HubDfqError, RuntimeError):
    """Another process of a multi-process run failed (the message names its rank and its error)."""


class SharedFilesystemError(HubDfqError, OSError):
    """An output folder that not every process of a multi-process run can see."""


@dataclass(frozen=True)
class ErrorRecord:
    """An error as plain data, so that it can cross processes (pickled, or as JSON with :meth:`to_dict`).

    Attributes:
        kind: the path of the class it is raised as elsewhere, a key of :data:`ERROR_TYPES`
            (``"hub_dfq.errors.DistributedError"`` for an exception hub-dfq does not know).
        message: the error's message.
        original: the path of the class that was raised (differs from ``kind`` for unknown exceptions).
        rank: the process that raised it.
    """

    kind: str
    message: str
    original: str
    rank: int = 0

    @classmethod
    def of(cls, err: BaseException, *, rank: int = 0) -> "ErrorRecord":
        """The record of ``err``: its own class where that is in :data:`ERROR_TYPES` (or a hub-dfq error
        class it derives from), else :class:`DistributedError`."""
        original = _path(type(err))
        if original in ERROR_TYPES:
            kind = original
        else:
            known = [c for c in type(err).__mro__ if issubclass(c, HubDfqError) and _path(c) in ERROR_TYPES]
            kind = _path(known[0]) if known else _path(DistributedError)
        return cls(kind=kind, message=str(err), original=original, rank=rank)

    def to_error(self) -> Exception:
        """The error to raise in this process: the same class, the message prefixed with the rank (``"rank 1: "``);
        an unknown exception is a :class:`DistributedError` that also names its original class."""
        cls = ERROR_TYPES.get(self.kind, DistributedError)
        message = f"rank {self.rank}: {self.message}"
        if cls is DistributedError and self.original != self.kind:
            message = f"{message} ({self.original})"
        return cls(message)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ErrorRecord":
        return cls(**data)
