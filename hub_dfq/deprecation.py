"""One helper for renamed keyword arguments, instead of a hand-written shim in every function.

huggingface_hub's ``_deprecate_arguments`` pattern: the decorator names the old spellings, so the
function body and its signature only know the new ones::

    @renamed_arguments(n="num_images")
    def synthesize_folder(model, method="bns", num_images=256, *, ...): ...

A call with an old name warns (``FutureWarning``, ``"`n` is deprecated: use `num_images`"``, pointing
at the caller's line) and goes on as if the new name had been used; giving both is an error, since
silently preferring one would hide a mistake.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from .errors import ArgumentTypeError

__all__ = ["MovedInto", "renamed_arguments", "warn_deprecated"]

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class MovedInto:
    """An old keyword whose value now goes under ``key`` of the mapping argument ``argument``.

    ``reconstruct_config=X`` became ``settings={"reconstruct": X}``:
    ``renamed_arguments(reconstruct_config=MovedInto("settings", "reconstruct"))``.
    """

    argument: str
    key: str

    def spelling(self) -> str:
        return f"{self.argument}={{'{self.key}': ...}}"


def warn_deprecated(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warn that ``old`` is deprecated in favour of ``new``, for changes a rename cannot express (``onnx=True``).

    ``FutureWarning``, not ``DeprecationWarning``: Python shows it to users of a script, not only to tests. The
    default ``stacklevel`` points at the caller of the function that calls this one.
    """
    warnings.warn(f"`{old}` is deprecated: use `{new}`", FutureWarning, stacklevel=stacklevel + 1)


def renamed_arguments(**renames: str | MovedInto) -> Callable[[F], F]:
    """Accept the old keyword names ``renames`` (``old="new"``) of the decorated function, with a warning.

    Args:
        renames: old name -> new argument name, or a :class:`MovedInto` for a value that moved into a mapping
            argument. Warnings follow this order when several old names are used in one call.

    Returns:
        A decorator; the function keeps its name, docstring and signature (``functools.wraps``).

    Raises:
        ArgumentTypeError: (at call time) an old name together with its new one, positional or keyword.

    Example:
        >>> @renamed_arguments(config="dataset_config")
        ... def load(spec, *, dataset_config=None): ...
    """

    def decorate(func: F) -> F:
        signature = inspect.signature(func)
        name = getattr(func, "__qualname__", getattr(func, "__name__", "function"))
        for new in renames.values():  # a typo here would drop the value silently at every call
            target = new.argument if isinstance(new, MovedInto) else new
            if target not in signature.parameters:
                raise TypeError(f"{name}() has no argument {target!r} to rename to")

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            old_names = [old for old in renames if old in kwargs]
            if not old_names:  # the common case costs one scan of the keywords
                return func(*args, **kwargs)
            values = {old: kwargs.pop(old) for old in old_names}
            given = signature.bind_partial(*args, **kwargs).arguments  # catches the new name given positionally
            for old in old_names:
                new = renames[old]
                if isinstance(new, MovedInto):
                    mapping = given.get(new.argument) or {}
                    if new.key in mapping:
                        raise ArgumentTypeError(f"{name}() got both `{old}` (deprecated) and `{new.spelling()}`: "
                                                f"pass only `{new.spelling()}`")
                    warn_deprecated(old, new.spelling(), stacklevel=2)
                    given[new.argument] = {**mapping, new.key: values[old]}
                else:
                    if new in given:
                        raise ArgumentTypeError(f"{name}() got both `{old}` (deprecated) and `{new}`: pass only "
                                                f"`{new}`")
                    warn_deprecated(old, new, stacklevel=2)
                    given[new] = values[old]
            bound = inspect.BoundArguments(signature, given)
            return func(*bound.args, **bound.kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
