"""The shape all three catalogs share: entries by name, in the order they were registered."""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar


class Named(Protocol):
    name: str


EntryT = TypeVar("EntryT", bound=Named)


class Catalog(dict[str, EntryT], Generic[EntryT]):
    """A dict of entries by name (iteration order = registration order, which the help and the
    Slicer panel list them in); ``kind`` names the entries in errors ("method")."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, entry: EntryT) -> EntryT:
        """Add ``entry`` (a name is registered once)."""
        if entry.name in self:
            raise ValueError(f"{self.kind} {entry.name!r} is already in the catalog")
        self[entry.name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove entry ``name`` (tests register throw-away entries)."""
        del self[name]

    def names(self) -> tuple[str, ...]:
        """The entries' names, in catalog order."""
        return tuple(self)

    def entry(self, name: str) -> EntryT:
        """The entry ``name``; KeyError naming the known ones if there is none."""
        try:
            return self[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self)}") from None
