"""`memory://`: the in-process state store of the one-machine simulation.

Same semantics as the Redis backend (see cloud/state/store.py), minus
durability: everything is gone when the process ends. Each instance is a new,
empty federation, so simulations run back to back in one process never see
each other's state.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterator
from typing import Any

from edgefed.cloud.state.store import (
    QUARANTINE_KEEP,
    BufferedUpdate,
    FoldedUpdate,
    StaleAggregator,
    StateStore,
    VersionRecord,
)


class MemoryStateStore(StateStore):
    def __init__(self, federation: str) -> None:
        super().__init__(federation)
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
        self._buffer: OrderedDict[str, BufferedUpdate] = OrderedDict()
        self._delivered: set[str] = set()
        self._versions: dict[int, VersionRecord] = {}
        self._latest: int | None = None
        self._folded: dict[int, set[str]] = {}  # base version -> ids folded from it
        self._rejected: Counter[str] = Counter()
        self._devices: dict[str, dict[str, Any]] = {}
        self._attempts: Counter[str] = Counter()
        self._in_flight: int | None = None
        self._quarantine: deque[dict[str, Any]] = deque(maxlen=QUARANTINE_KEEP)

    def append_update(self, payload: bytes, meta: dict[str, Any]) -> str:
        with self._lock:
            entry_id = f"{next(self._ids)}-0"
            self._buffer[entry_id] = BufferedUpdate(entry_id, bytes(payload), dict(meta))
            self._lock.notify_all()
            return entry_id

    def read_updates(self, count: int, block_ms: int = 0) -> list[BufferedUpdate]:
        with self._lock:
            if block_ms and not self._undelivered():
                self._lock.wait(block_ms / 1000)
            fresh = self._undelivered()[:count]
            self._delivered.update(e.entry_id for e in fresh)
            return fresh

    def _undelivered(self) -> list[BufferedUpdate]:
        return [e for k, e in self._buffer.items() if k not in self._delivered]

    def reject(self, entry_id: str, reason: str) -> None:
        with self._lock:
            self._buffer.pop(entry_id, None)
            self._delivered.discard(entry_id)
            self._attempts.pop(entry_id, None)
            self._rejected[reason] += 1

    def begin_open(self, entry_id: str, opened: str | None = None) -> int:
        with self._lock:
            if opened is not None:
                self._attempts.pop(opened, None)
            self._attempts[entry_id] += 1
            return self._attempts[entry_id]

    def opened(self, entry_id: str) -> None:
        with self._lock:
            self._attempts.pop(entry_id, None)

    def quarantine(self, entry_id: str, reason: str, detail: str) -> None:
        with self._lock:
            entry = self._buffer.pop(entry_id, None)
            self._delivered.discard(entry_id)
            self._attempts.pop(entry_id, None)
            if entry is not None:
                self._quarantine.append({"entry_id": entry_id, "payload": entry.payload, "meta": entry.meta,
                                         "reason": reason, "detail": detail, "at": time.time()})
            self._rejected["quarantined"] += 1

    def quarantined(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(q) for q in self._quarantine]

    def buffer_depth(self) -> int:
        with self._lock:
            return len(self._buffer)

    def note_in_flight(self, count: int) -> None:
        self._in_flight = int(count)

    def in_flight(self) -> int | None:
        return self._in_flight

    def commit_version(self, record: VersionRecord, entry_ids: list[str], folded: list[FoldedUpdate],
                       keep: int) -> None:
        with self._lock:
            expected = -1 if self._latest is None else self._latest
            if record.version != expected + 1:
                raise StaleAggregator(f"commit of version {record.version}, but the latest is {self._latest}")
            self._versions[record.version] = record
            self._latest = record.version
            for base, update_id in folded:
                self._folded.setdefault(base, set()).add(update_id)
            for entry_id in entry_ids:
                self._buffer.pop(entry_id, None)
                self._delivered.discard(entry_id)
                self._attempts.pop(entry_id, None)
            for old in [v for v in self._versions if v <= record.version - keep]:
                del self._versions[old]
            for old in [v for v in self._folded if v <= record.version - keep]:
                del self._folded[old]
            self._lock.notify_all()

    def latest_version(self) -> int | None:
        return self._latest

    def load_version(self, version: int) -> VersionRecord | None:
        return self._versions.get(version)

    def is_folded(self, update_id: str, base_version: int) -> bool:
        return update_id in self._folded.get(base_version, ())

    def rejected_counts(self) -> dict[str, int]:
        return dict(self._rejected)

    def note_devices(self, fields_by_device: dict[str, dict[str, Any]]) -> None:
        with self._lock:
            for device, fields in fields_by_device.items():
                self._devices.setdefault(device, {}).update(fields)

    def devices(self) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in self._devices.items()}

    def watch_versions(self, timeout_s: float) -> Iterator[int]:
        seen = self._latest
        while True:
            with self._lock:
                if not self._lock.wait_for(lambda: self._latest != seen, timeout_s):
                    return
                seen = self._latest
            yield seen
