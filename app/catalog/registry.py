"""One registry shape for the catalog's specs (app.catalog) and the workers' implementations (workers.methods)."""
from __future__ import annotations

from typing import Generic, TypeVar

from app.errors import UnknownMethod

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by method id: one per id (registering a second, different entry under a taken id is a bug);
    looking up an unknown id raises UnknownMethod naming the known ones."""

    def __init__(self) -> None:
        self.entries: dict[str, T] = {}

    def add(self, method_id: str, entry: T) -> T:
        existing = self.entries.get(method_id)
        if existing is not None and existing != entry:
            raise ValueError(f"method id {method_id!r} is already registered")
        self.entries[method_id] = entry
        return entry

    def get(self, method_id: str) -> T:
        try:
            return self.entries[method_id]
        except KeyError:
            known = sorted(self.entries)
            raise UnknownMethod(f"unknown method {method_id!r}; known methods: {', '.join(known) or 'none'}",
                                known=known) from None
