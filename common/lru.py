"""A small in-process cache that forgets the least recently used entry past its size.

The per-process caches of the ClientApp (a device's residual, its installed
model, its features) are keyed by device: one Ray actor of a simulation
serves many simulated devices in turn, so an unbounded dict would grow with
the fleet. What they hold is also on disk, so forgetting costs a reread."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Lru(Generic[K, V]):
    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"an LRU cache holds at least one entry, got size {size}")
        self.size = size
        self._entries: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K, make: Callable[[], V], valid: Callable[[V], bool] | None = None) -> V:
        """The entry for `key`, made with `make()` (and the oldest entry forgotten past `size`) if absent, or
        if `valid` says the entry it holds is no longer good (e.g. its file was replaced by another process)."""
        if key in self._entries and (valid is None or valid(self._entries[key])):
            self._entries.move_to_end(key)
            return self._entries[key]
        value = make()
        self.put(key, value)
        return value

    def peek(self, key: K) -> V | None:
        """The entry for `key` (now the most recently used), or None."""
        if key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key]

    def put(self, key: K, value: V) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def pop(self, key: K) -> V | None:
        return self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def clear(self) -> None:
        self._entries.clear()
