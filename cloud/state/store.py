"""Durable aggregator state: the update buffer, global versions, devices, events.

One interface, two backends chosen by URL (`open_state_store`):

- `redis://host:port/db` — the cloud service (cloud/state/redis_store.py): a Stream
  of sealed updates read through a consumer group, hashes for versions and
  devices, pub/sub for new-version events. Run Redis with AOF persistence
  (`appendonly yes`, `appendfsync everysec` or `always`).
- `memory://` — in-process, the default of the one-machine simulation
  (cloud/state/memory_store.py). It has the same semantics but dies with the process.

The contract both keep, which is what makes the aggregator crash-safe:

1. `append_update` is the acknowledgement. Once it returns, the update is in
   the buffer and survives an aggregator crash (Redis backend).
2. An update leaves the buffer only inside `commit_version` (folded into the
   new version, atomically with the version itself and the ids it folded) or
   `reject` (atomically with its rejection count). An aggregator killed between
   reading and committing finds the same updates again through `read_updates`.
3. State is keyed by the federation name, not by Flower's run id, so a
   restarted aggregator (a new Flower run) resumes the same federation.
"""

from __future__ import annotations

import json
import stat
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from edgefed.common.config import EdgefedConfig, redact_url

QUARANTINE_KEEP = 1000  # quarantined entries kept for inspection (older ones are dropped)


class StateStoreError(RuntimeError):
    """The store is unreachable, misconfigured, or its state is inconsistent."""


class StaleAggregator(StateStoreError):
    """Another aggregator committed a version first: this one must stop (fencing)."""


@dataclass
class BufferedUpdate:
    """One entry of the update buffer: the sealed bytes and what the transport knew."""

    entry_id: str
    payload: bytes
    meta: dict[str, Any] = field(default_factory=dict)
    # handed to an earlier aggregator process that neither committed nor rejected it (it may have died
    # opening it): the aggregator counts attempts to open such entries (`begin_open`), not fresh ones
    redelivered: bool = False


class FoldedUpdate(NamedTuple):
    """An update id folded into a version, filed under the (signed) base version it was trained on."""

    base_version: int
    update_id: str


@dataclass
class VersionRecord:
    """A global version as the store keeps it (the checkpoint the aggregator resumes from)."""

    version: int
    adapter: bytes  # lossless codec bytes of the global adapter
    optimizer: bytes = b""  # server optimizer state (codec bytes), empty for plain SGD
    meta: dict[str, Any] = field(default_factory=dict)  # folded update ids, staleness, time, ...
    mac: bytes = b""  # authenticates the record under the cloud's state key (cloud/state/version_mac.py)

    def meta_json(self) -> str:
        return json.dumps(self.meta, sort_keys=True)


class StateStore(ABC):
    """What the asynchronous aggregator needs from durable storage."""

    def __init__(self, federation: str) -> None:
        if not federation:
            raise StateStoreError("a state store needs a federation name")
        self.federation = federation

    # --- update buffer -------------------------------------------------------
    @abstractmethod
    def append_update(self, payload: bytes, meta: dict[str, Any]) -> str:
        """Durably buffer a received update; returns its entry id (the acknowledgement)."""

    @abstractmethod
    def read_updates(self, count: int, block_ms: int = 0) -> list[BufferedUpdate]:
        """Entries not yet handed to this aggregator process: after a restart, first those
        read but never committed or rejected by the previous process, then new ones."""

    @abstractmethod
    def reject(self, entry_id: str, reason: str) -> None:
        """Drop an entry from the buffer and count its rejection reason, atomically."""

    @abstractmethod
    def begin_open(self, entry_id: str, opened: str | None = None) -> int:
        """Count an attempt to open an entry, before it is opened; returns the attempts counted so far, this one
        included. An entry whose opening keeps killing the aggregator shows up here with a growing count (the
        aggregator counts only redelivered entries: a fresh entry's first attempt costs no write).
        `opened`: the entry opened just before, whose attempts are forgotten first (`opened()` in the same
        round trip: one store write an update)."""

    @abstractmethod
    def opened(self, entry_id: str) -> None:
        """The entry was opened without incident: forget its attempts."""

    @abstractmethod
    def quarantine(self, entry_id: str, reason: str, detail: str) -> None:
        """Take an entry out of the buffer for good, atomically: keep its bytes, meta and the reason
        for inspection (`quarantined`), count it as a rejection (`quarantined`)."""

    @abstractmethod
    def quarantined(self) -> list[dict[str, Any]]:
        """The kept quarantined entries, oldest first (at most QUARANTINE_KEEP)."""

    @abstractmethod
    def buffer_depth(self) -> int:
        """Entries in the buffer: received, not yet folded or rejected."""

    @abstractmethod
    def note_in_flight(self, count: int) -> None:
        """How many instructions the running aggregator has out (the service's metrics read it)."""

    @abstractmethod
    def in_flight(self) -> int | None:
        """The count noted last (None before any)."""

    # --- versions -------------------------------------------------------------
    @abstractmethod
    def commit_version(self, record: VersionRecord, entry_ids: list[str], folded: list[FoldedUpdate],
                       keep: int) -> None:
        """Atomically: store the version, make it the latest, mark the `folded` update ids folded,
        remove `entry_ids` from the buffer, forget versions older than `keep` back and the ids folded
        from those base versions (an update on a base that old is refused as too stale, replayed or
        not: what the store keeps stays bounded by `keep` versions' worth), and publish the
        new-version event. Raises StaleAggregator unless the latest
        version is `record.version - 1` (or the store is empty and this is version 0)."""

    @abstractmethod
    def latest_version(self) -> int | None:
        """The newest committed version number, or None for a new federation."""

    @abstractmethod
    def load_version(self, version: int) -> VersionRecord | None:
        """A kept version (the latest and up to `keep - 1` before it), else None."""

    @abstractmethod
    def is_folded(self, update_id: str, base_version: int) -> bool:
        """Whether an update id trained on `base_version` is already part of a committed version
        (answered for the base versions still kept)."""

    @abstractmethod
    def rejected_counts(self) -> dict[str, int]:
        """Rejections by reason since the federation began."""

    # --- devices and events ------------------------------------------------------
    def note_device(self, device: str, fields: dict[str, Any]) -> None:
        """Merge fields into a device's record (last seen, counts, capabilities)."""
        self.note_devices({device: fields})

    @abstractmethod
    def note_devices(self, fields_by_device: dict[str, dict[str, Any]]) -> None:
        """`note_device` for several devices at once (those of one version)."""

    @abstractmethod
    def devices(self) -> dict[str, dict[str, Any]]:
        """All device records."""

    @abstractmethod
    def watch_versions(self, timeout_s: float) -> Iterator[int]:
        """Yield new version numbers as they are committed, until `timeout_s` passes quietly."""

    def close(self) -> None:  # noqa: B027 - optional for backends with nothing to release
        """Release connections."""


def open_state_store(url: str, federation: str, password: str | None = None) -> StateStore:
    """`memory://` or `redis://host:port[/db]` (also `rediss://` for TLS, `redis+cluster://host:port` for any
    node of a Redis Cluster); `password` authenticates to Redis."""
    if url in ("memory://", "memory"):
        from edgefed.cloud.state.memory_store import MemoryStateStore

        return MemoryStateStore(federation)
    if url.startswith(("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")):
        from edgefed.cloud.state.redis_store import RedisStateStore

        return RedisStateStore(url, federation, password)
    raise StateStoreError(f"unknown state store URL {redact_url(url)!r}: use memory:// or redis://host:port/db")


def store_for(cfg: EdgefedConfig) -> StateStore:
    """The state store a run config names, with the password from `state-store-password-file` if set."""
    return open_state_store(cfg.state_store, cfg.federation, read_password_file(cfg.state_store_password_file))


def read_password_file(path: str) -> str | None:
    """The Redis password kept in a file that only its owner (and group) may read; None for no file."""
    if not path:
        return None
    file = Path(path)
    try:
        mode = file.stat().st_mode
        text = file.read_text(encoding="utf-8").strip()
    except OSError as err:
        raise StateStoreError(f"state-store-password-file {path}: {err.strerror}") from None
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise StateStoreError(f"state-store-password-file {path} is readable or writable by everyone: chmod 600 it")
    if not text:
        raise StateStoreError(f"state-store-password-file {path} is empty")
    return text
