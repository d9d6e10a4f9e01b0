"""Which updates the aggregator may still take: the base versions it accepts, the update ids it has taken.

The update opener asks a window two things about every update it opens:
whether its base version is acceptable (`refusal`) and whether its id was
already taken (`has_taken`, a replay or a duplicate delivery; asked with the
update's signed base version, under which the store files the ids it folded);
it tells the window when an update passed (`take`). Two windows, one per aggregation mode:

- `StalenessWindow` (asynchronous FedBuff): any of the last `max-staleness`
  published versions; the ids taken are those folded into a version (in the
  durable store) plus those opened and waiting in the buffer.
- `IssuedVersions` (synchronous rounds): exactly the versions sent to clients;
  the ids taken are appended to a file in the run directory, so a restarted
  run (which issues the same version numbers again) still refuses replays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol


class VersionWindow(Protocol):
    def refusal(self, base_version: int) -> tuple[str, str] | None:
        """(reason, detail) if an update trained on `base_version` must be refused, else None."""

    def has_taken(self, update_id: str, base_version: int) -> bool:
        """Whether an update with this id (trained on `base_version`) was already accepted."""

    def take(self, update_id: str) -> None:
        """Record an accepted update's id."""


class StalenessWindow:
    """Async: bases from `current - max_staleness` to `current`; ids folded (store) or buffered (here).

    The store forgets the ids folded from a base version once that base falls out of the window: a replay
    of such an update is refused as too stale, so remembering it would only make the store grow."""

    def __init__(self, max_staleness: int, is_folded: Callable[[str, int], bool]) -> None:
        self.max_staleness = max_staleness
        self.is_folded = is_folded
        self.current = -1  # the newest published version (-1 before the federation starts)
        self._buffered: set[str] = set()

    @property
    def oldest(self) -> int:
        return self.current - self.max_staleness

    def advance(self, version: int, folded: Iterable[str] = ()) -> None:
        """`version` is published; the `folded` ids are in it (the store answers for them from now on)."""
        self.current = version
        self._buffered.difference_update(folded)

    def refusal(self, base_version: int) -> tuple[str, str] | None:
        if self.oldest <= base_version <= self.current:
            return None
        if 0 <= base_version < self.oldest:
            return "too-stale", f"base version {base_version} is older than the oldest accepted ({self.oldest})"
        return "unknown-base-version", f"base version {base_version} is not one we issued"

    def has_taken(self, update_id: str, base_version: int) -> bool:
        return update_id in self._buffered or self.is_folded(update_id, base_version)

    def take(self, update_id: str) -> None:
        self._buffered.add(update_id)


class IssuedVersions:
    """Sync: exactly the global versions sent to clients; ids taken, kept in `taken_log` when given."""

    def __init__(self, taken_log: Path | None = None) -> None:
        self.issued: set[int] = set()
        self.taken_log = taken_log
        self._taken: set[str] = set()
        if taken_log is not None and taken_log.exists():
            self._taken = set(taken_log.read_text(encoding="utf-8").split())

    def issue(self, version: int) -> None:
        self.issued.add(version)

    def refusal(self, base_version: int) -> tuple[str, str] | None:
        if base_version in self.issued:
            return None
        return "unknown-base-version", f"base version {base_version} is not one we issued"

    def has_taken(self, update_id: str, base_version: int) -> bool:
        return update_id in self._taken

    def take(self, update_id: str) -> None:
        self._taken.add(update_id)
        if self.taken_log is not None:
            self.taken_log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.taken_log, "a", encoding="utf-8") as log:
                log.write(update_id + "\n")
