"""One generic, open registry: names to classes, with listing errors.

``Registry("factorization")`` holds classes under names; ``register(name)`` is a class
decorator; ``get(name_or_class)`` accepts a registered name or the class itself and raises
:class:`~tensadapt.errors.UnknownNameError` listing the valid names otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from fnmatch import fnmatch
from typing import Generic, TypeVar

from .errors import UnknownNameError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """A named mapping ``name -> class`` that users can extend."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, type[T]] = {}

    def register(self, name: str, *, overwrite: bool = False) -> Callable[[type[T]], type[T]]:
        """Class decorator registering ``cls`` under ``name`` (sets ``cls.name`` too)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def decorator(cls: type[T]) -> type[T]:
            if name in self._items and self._items[name] is not cls and not overwrite:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered to "
                    f"{self._items[name].__qualname__}; pass overwrite=True to replace it"
                )
            cls.name = name  # type: ignore[attr-defined]
            self._items[name] = cls
            return cls

        return decorator

    def get(self, key: str | type[T]) -> type[T]:
        """The class registered as ``key``; a class passes through unchanged."""
        if isinstance(key, type):
            return key
        try:
            return self._items[key]
        except (KeyError, TypeError):
            raise UnknownNameError(
                f"unknown {self.kind} {key!r}; valid {self.kind}s are: "
                f"{', '.join(sorted(self._items))}"
            ) from None

    def name_of(self, key: str | type[T]) -> str:
        """The registered name of ``key`` (a class registered elsewhere keeps its ``name``)."""
        if isinstance(key, str):
            self.get(key)
            return key
        for name, cls in self._items.items():
            if cls is key:
                return name
        return getattr(key, "name", key.__qualname__)

    def list(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching a shell-style ``pattern``."""
        return sorted(n for n in self._items if fnmatch(n, pattern))

    def __contains__(self, key: object) -> bool:
        return key in self._items
