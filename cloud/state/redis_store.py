"""`redis://`: the cloud service's state store, on a real Redis.

Layout, every key under `edgefed:<federation>:`

    updates             Stream of sealed updates (fields: payload, meta),
                        read through consumer group "aggregator"
    latest              the newest committed version number
    version:<v>         hash: adapter, optimizer, meta, mac (the resumable checkpoint)
    folded              set of update ids already part of a version
    rejected            hash: reason -> count
    attempts            hash: entry id -> times its opening began (cleared once opened, folded or rejected)
    quarantine          Stream of entries taken out for good (payload, meta, reason, detail), capped
    devices             hash: device id -> JSON record
    versions (channel)  pub/sub: the new version number on every commit

An entry is XACKed and XDELed only inside the MULTI/EXEC that commits the
version folding it (or counts its rejection), so a crash anywhere before EXEC
leaves it in the consumer group's pending list, where the restarted
aggregator reads it again. `latest` is WATCHed during a commit: a second
aggregator on the same federation makes the first fail loudly (fencing).
Production: run Redis with `appendonly yes` so acknowledged updates survive a
Redis restart too, with a password (`requirepass`; the aggregator reads it from
`state-store-password-file`, never from the URL), and reachable only by the
cloud (a NetworkPolicy or a private network; `rediss://` for TLS across hosts).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import redis

from edgefed.cloud.state.store import (
    QUARANTINE_KEEP,
    BufferedUpdate,
    StaleAggregator,
    StateStore,
    StateStoreError,
    VersionRecord,
)
from edgefed.common.config import redact_url

GROUP = "aggregator"
CONSUMER = "aggregator"  # one logical aggregator per federation: its pending list survives restarts


class RedisStateStore(StateStore):
    def __init__(self, url: str, federation: str, password: str | None = None) -> None:
        super().__init__(federation)
        options = {"password": password} if password is not None else {}
        try:
            self.r = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10, **options)
            self.r.ping()
        except redis.AuthenticationError:
            raise StateStoreError(f"Redis at {redact_url(url)} refused the password "
                                  "(check state-store-password-file)") from None
        except redis.RedisError as err:
            raise StateStoreError(f"cannot reach Redis at {redact_url(url)}: {err}") from None
        prefix = f"edgefed:{federation}:"
        self.stream, self.latest_key, self.folded_key = prefix + "updates", prefix + "latest", prefix + "folded"
        self.rejected_key, self.devices_key, self.channel = prefix + "rejected", prefix + "devices", prefix + "versions"
        self.version_prefix = prefix + "version:"
        self.attempts_key, self.quarantine_stream = prefix + "attempts", prefix + "quarantine"
        try:
            self.r.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise StateStoreError(f"cannot create the consumer group: {err}") from None
        self._backlog_cursor: str | None = "0"  # first, re-read what a previous process left pending

    def append_update(self, payload: bytes, meta: dict[str, Any]) -> str:
        entry_id = self.r.xadd(self.stream, {"payload": bytes(payload), "meta": json.dumps(meta, sort_keys=True)})
        return entry_id.decode()

    def read_updates(self, count: int, block_ms: int = 0) -> list[BufferedUpdate]:
        if self._backlog_cursor is not None:
            reply = self.r.xreadgroup(GROUP, CONSUMER, {self.stream: self._backlog_cursor}, count=count)
            entries = reply[0][1] if reply else []
            if entries:
                self._backlog_cursor = entries[-1][0].decode()
                return [_entry(e) for e in entries if e[1]]  # deleted-but-pending entries come back empty
            self._backlog_cursor = None
        reply = self.r.xreadgroup(GROUP, CONSUMER, {self.stream: ">"}, count=count, block=block_ms or None)
        return [_entry(e) for e in (reply[0][1] if reply else [])]

    def reject(self, entry_id: str, reason: str) -> None:
        with self.r.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, GROUP, entry_id).xdel(self.stream, entry_id).hdel(self.attempts_key, entry_id)
            pipe.hincrby(self.rejected_key, reason, 1).execute()

    def begin_open(self, entry_id: str) -> int:
        return int(self.r.hincrby(self.attempts_key, entry_id, 1))

    def opened(self, entry_id: str) -> None:
        self.r.hdel(self.attempts_key, entry_id)

    def quarantine(self, entry_id: str, reason: str, detail: str) -> None:
        entries = self.r.xrange(self.stream, entry_id, entry_id)
        fields = entries[0][1] if entries else {}
        with self.r.pipeline(transaction=True) as pipe:
            pipe.xadd(self.quarantine_stream, {"entry_id": entry_id, "payload": fields.get(b"payload", b""),
                                               "meta": fields.get(b"meta", b"{}"), "reason": reason,
                                               "detail": detail[:2000], "at": time.time()},
                      maxlen=QUARANTINE_KEEP, approximate=False)
            pipe.xack(self.stream, GROUP, entry_id).xdel(self.stream, entry_id).hdel(self.attempts_key, entry_id)
            pipe.hincrby(self.rejected_key, "quarantined", 1).execute()

    def quarantined(self) -> list[dict[str, Any]]:
        out = []
        for _, fields in self.r.xrange(self.quarantine_stream):
            record = {k.decode(): v for k, v in fields.items()}
            out.append({**{k: v.decode(errors="replace") for k, v in record.items() if k != "payload"},
                        "payload": record.get("payload", b""), "at": float(record.get("at", b"0"))})
        return out

    def buffer_depth(self) -> int:
        return int(self.r.xlen(self.stream))

    def commit_version(self, record: VersionRecord, entry_ids: list[str], update_ids: list[str], keep: int) -> None:
        with self.r.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(self.latest_key)
                current = pipe.get(self.latest_key)
                expected = -1 if current is None else int(current)
                if record.version != expected + 1:
                    raise StaleAggregator(f"commit of version {record.version}, but the latest is {expected}")
                pipe.multi()
                pipe.hset(self.version_prefix + str(record.version),
                          mapping={"adapter": record.adapter, "optimizer": record.optimizer, "meta": record.meta_json(),
                                   "mac": record.mac})
                pipe.set(self.latest_key, record.version)
                if update_ids:
                    pipe.sadd(self.folded_key, *update_ids)
                if entry_ids:
                    pipe.xack(self.stream, GROUP, *entry_ids).xdel(self.stream, *entry_ids)
                    pipe.hdel(self.attempts_key, *entry_ids)
                if record.version - keep >= 0:
                    pipe.delete(self.version_prefix + str(record.version - keep))
                pipe.publish(self.channel, record.version)
                pipe.execute()
            except redis.WatchError:
                raise StaleAggregator(f"another aggregator committed while version {record.version} was built") from None

    def latest_version(self) -> int | None:
        value = self.r.get(self.latest_key)
        return None if value is None else int(value)

    def load_version(self, version: int) -> VersionRecord | None:
        fields = self.r.hgetall(self.version_prefix + str(version))
        if not fields:
            return None
        try:
            return VersionRecord(version, fields[b"adapter"], fields.get(b"optimizer", b""),
                                 json.loads(fields[b"meta"]), fields.get(b"mac", b""))
        except (KeyError, ValueError) as err:  # not written by an aggregator: the MAC check would refuse it too
            raise StateStoreError(f"version {version} in the state store is unreadable ({err})") from None

    def is_folded(self, update_id: str) -> bool:
        return bool(self.r.sismember(self.folded_key, update_id))

    def rejected_counts(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.r.hgetall(self.rejected_key).items()}

    def note_device(self, device: str, fields: dict[str, Any]) -> None:
        raw = self.r.hget(self.devices_key, device)
        record = {**(json.loads(raw) if raw else {}), **fields}
        self.r.hset(self.devices_key, device, json.dumps(record, sort_keys=True))

    def devices(self) -> dict[str, dict[str, Any]]:
        return {k.decode(): json.loads(v) for k, v in self.r.hgetall(self.devices_key).items()}

    def watch_versions(self, timeout_s: float) -> Iterator[int]:
        pubsub = self.r.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self.channel)
        try:
            deadline = time.monotonic() + timeout_s
            while (left := deadline - time.monotonic()) > 0:
                message = pubsub.get_message(timeout=left)  # None also for the subscribe confirmation
                if message is not None:
                    yield int(message["data"])
                    deadline = time.monotonic() + timeout_s
        finally:
            pubsub.close()

    def close(self) -> None:
        self.r.close()


def _entry(entry: tuple) -> BufferedUpdate:
    """A stream entry; one not written by `append_update` reads as an empty update, which the opener refuses."""
    entry_id, fields = entry
    try:
        meta = json.loads(fields.get(b"meta", b"{}"))
    except (ValueError, UnicodeDecodeError):
        meta = {}
    return BufferedUpdate(entry_id.decode(), fields.get(b"payload", b""), meta if isinstance(meta, dict) else {})
