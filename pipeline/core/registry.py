"""One registry shape for everything made by name.

A :class:`Registry` maps a name to a factory and a one-line description; an unknown name
raises :class:`UnknownNameError` with close matches and the list of known names.
Models, losses, TTA sets, augmentations, optimizers, schedulers, mask rules, ensemble
methods and post-processors are all registries of this one class.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pipeline.core.errors import UnknownNameError

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Entry(Generic[F]):
    name: str
    factory: F
    description: str


class Registry(Generic[F]):
    """Name -> factory; names are case-insensitive, aliases resolve to one entry."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[F]] = {}
        self._aliases: dict[str, str] = {}

    def add(self, name: str, factory: F, description: str = "", aliases: tuple[str, ...] = ()) -> F:
        key = name.lower()
        if key in self._entries or key in self._aliases:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[key] = Entry(name, factory, description)
        for alias in aliases:
            self._aliases[alias.lower()] = key
        return factory

    def register(self, name: str, description: str = "", aliases: tuple[str, ...] = ()) -> Callable[[F], F]:
        """Decorator form of :meth:`add`."""

        def deco(factory: F) -> F:
            return self.add(name, factory, description, aliases)

        return deco

    def key(self, name: str) -> str:
        """The canonical name of ``name`` (alias or other case), or UnknownNameError."""
        key = str(name).strip().lower()
        key = self._aliases.get(key, key)
        if key not in self._entries:
            close = difflib.get_close_matches(key, list(self._entries) + list(self._aliases), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UnknownNameError(f"unknown {self.kind} {name!r}{hint}; known: {', '.join(self.names())}")
        return self._entries[key].name

    def entry(self, name: str) -> Entry[F]:
        return self._entries[self.key(name).lower()]

    def get(self, name: str) -> F:
        return self.entry(name).factory

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        return [e.name for e in self._entries.values()]

    def describe(self) -> list[tuple[str, str]]:
        return [(e.name, e.description) for e in self._entries.values()]

    def __contains__(self, name: object) -> bool:
        key = str(name).strip().lower()
        return self._aliases.get(key, key) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
