"""Every error hub-dfq raises on purpose.

Each class also inherits the builtin it stands for, so callers can catch either. Messages name the
offending value and say what to do instead; the CLI prints them as one line.
"""

from __future__ import annotations


class HubDfqError(Exception):
    """Base class of every error hub-dfq raises deliberately."""


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
