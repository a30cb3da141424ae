"""Registries of what grows: synthesis methods, quantization algorithms, observers, presets, backends.

A registry maps a name to a frozen descriptor (a dataclass: name, one-line summary, capability
flags, defaults, and the function that runs it), in the manner of timm's ``OptimInfo`` registry.
Everything that lists or describes the entries (CLI choices and help, cards, cache keys, docs
tables, error messages) reads the registry, so adding an entry is one module plus one
registration.

Descriptors name their function either directly (a callable) or as ``"package.module:attribute"``,
resolved on first use, so the built-in registries can be read (``hub-dfq --help``) without importing
torch.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Generic, Iterator, TypeVar

from .errors import ConfigError

__all__ = ["Registry", "resolve"]

T = TypeVar("T")


def resolve(target: Any) -> Any:
    """``target`` itself, or the attribute a ``"package.module:attribute"`` string names."""
    if not isinstance(target, str):
        return target
    module_name, sep, attribute = target.partition(":")
    if not sep:
        raise ValueError(f"a lazy reference must look like 'package.module:attribute', got {target!r}")
    value: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        value = getattr(value, part)
    return value


class Registry(Generic[T]):
    """Named descriptors of one sort, in registration order.

    Args:
        what: what the entries are, for messages (``"synthesis method"``).
        argument: the argument that names an entry (``"method"``), for messages.
    """

    def __init__(self, what: str, argument: str | None = None) -> None:
        self.what = what
        self.argument = argument or what
        self._entries: dict[str, T] = {}

    def register(self, entry: T, *, overwrite: bool = False) -> T:
        """Add ``entry`` (any object with a ``name``); returns it, so it also works as a decorator target.

        Raises:
            ConfigError: the name is taken and ``overwrite`` is false.
        """
        name = getattr(entry, "name", None)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a {self.what} needs a non-empty string name, got {name!r}")
        if name in self._entries and not overwrite:
            raise ConfigError(f"a {self.what} named {name!r} is already registered: pick another name or pass "
                              "overwrite=True")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> T:
        """Remove and return the entry ``name`` (e.g. a plugin's, at the end of a test)."""
        return self._entries.pop(self.get(name).name)  # type: ignore[attr-defined]

    def get(self, name: str, *, among: list[str] | None = None) -> T:
        """The entry called ``name``.

        Args:
            name: the entry's name.
            among: the names that would work here (e.g. the methods that fit a model), for the message.

        Raises:
            ConfigError: no entry has that name.
        """
        if name in self._entries:
            return self._entries[name]
        choices = among if among is not None else self.names()
        raise ConfigError(f"unknown {self.argument} {name!r}: use one of {', '.join(choices) or 'none'}")

    def names(self, where: Callable[[T], bool] | None = None) -> list[str]:
        """Names of the entries (that satisfy ``where``), in registration order."""
        return [name for name, entry in self._entries.items() if where is None or where(entry)]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self._entries)})"
