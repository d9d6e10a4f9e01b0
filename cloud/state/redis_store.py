"""`redis://`: the cloud service's state store, on a real Redis.

Layout, every key under `edgefed:{<federation>}:` (`key_prefix`)

    updates             Stream of sealed updates (fields: payload, meta),
                        read through consumer group "aggregator"
    latest              the newest committed version number
    version:<v>         hash: adapter, optimizer, meta, mac (the resumable checkpoint)
    folded:<b>          set of the ids of updates trained on base version b that
                        are part of a version
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
What the store holds stays bounded however long the federation runs: the
latest `keep` versions (the commit of v deletes `version:<v - keep>`), the
folded ids of the base versions still accepted (it deletes `folded:<v - keep>`
too: an update on that base is refused as too stale, replayed or not), the
updates buffered and not yet folded, one record per device, a capped
quarantine. `tests/test_state_store.py` folds 100,000 updates and finds
Redis's memory flat.

Redis Cluster: the braces make the federation name the keys' hash tag, so
every key of a federation lives in one slot and the MULTI/EXEC of a commit
(and the WATCH that fences a second aggregator) works on a cluster as on one
server; point `state-store` at any node with `redis+cluster://host:port`
(`rediss+cluster://` for TLS). A cluster pipeline cannot carry PUBLISH, so
there the new-version event goes out right after the EXEC; an aggregator
killed between the two leaves watchers without that one event (the version
itself is committed, and `latest` says so).
Keys written before the hash tag (`edgefed:<federation>:...`, one flat
`folded` set) are renamed on first connection to a standalone server; the
flat set is kept and consulted until every base version it can hold has
fallen out of the window, then deleted.

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
    FoldedUpdate,
    StaleAggregator,
    StateStore,
    StateStoreError,
    VersionRecord,
)
from edgefed.common.config import redact_url

GROUP = "aggregator"
CONSUMER = "aggregator"  # one logical aggregator per federation: its pending list survives restarts
CLUSTER_SCHEMES = {"redis+cluster://": "redis://", "rediss+cluster://": "rediss://"}


def key_prefix(federation: str) -> str:
    """Every key of a federation starts with this; the braces are its Redis Cluster hash tag."""
    return f"edgefed:{{{federation}}}:"


def _connect(url: str, password: str | None) -> redis.Redis:
    options: dict[str, Any] = {"socket_timeout": 30, "socket_connect_timeout": 10}
    if password is not None:
        options["password"] = password
    for scheme, plain in CLUSTER_SCHEMES.items():
        if url.startswith(scheme):
            from redis.cluster import RedisCluster

            return RedisCluster.from_url(plain + url[len(scheme):], **options)
    return redis.Redis.from_url(url, **options)


class RedisStateStore(StateStore):
    def __init__(self, url: str, federation: str, password: str | None = None) -> None:
        super().__init__(federation)
        try:
            self.r = _connect(url, password)
            self.r.ping()
        except redis.AuthenticationError:
            raise StateStoreError(f"Redis at {redact_url(url)} refused the password "
                                  "(check state-store-password-file)") from None
        except redis.RedisError as err:
            raise StateStoreError(f"cannot reach Redis at {redact_url(url)}: {err}") from None
        prefix = key_prefix(federation)
        self.stream, self.latest_key, self.folded_prefix = prefix + "updates", prefix + "latest", prefix + "folded:"
        self.rejected_key, self.devices_key, self.channel = prefix + "rejected", prefix + "devices", prefix + "versions"
        self.version_prefix = prefix + "version:"
        self.attempts_key, self.quarantine_stream = prefix + "attempts", prefix + "quarantine"
        self.legacy_folded_key = prefix + "folded"
        self.in_flight_key = prefix + "in-flight"
        self.cluster = url.startswith(tuple(CLUSTER_SCHEMES))
        if not self.cluster:
            _rename_untagged_keys(self.r, federation)
        # ids folded before they were filed by base version: consulted until every base they can hold is too old
        self._legacy_folded_since = self.latest_version() if self.r.exists(self.legacy_folded_key) else None
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
                # deleted-but-pending entries come back empty
                return [_entry(e, redelivered=True) for e in entries if e[1]]
            self._backlog_cursor = None
        reply = self.r.xreadgroup(GROUP, CONSUMER, {self.stream: ">"}, count=count, block=block_ms or None)
        return [_entry(e) for e in (reply[0][1] if reply else [])]

    def reject(self, entry_id: str, reason: str) -> None:
        with self.r.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, GROUP, entry_id).xdel(self.stream, entry_id).hdel(self.attempts_key, entry_id)
            pipe.hincrby(self.rejected_key, reason, 1).execute()

    def begin_open(self, entry_id: str, opened: str | None = None) -> int:
        if opened is None:
            return int(self.r.hincrby(self.attempts_key, entry_id, 1))
        with self.r.pipeline(transaction=False) as pipe:
            return int(pipe.hdel(self.attempts_key, opened).hincrby(self.attempts_key, entry_id, 1).execute()[1])

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

    def note_in_flight(self, count: int) -> None:
        self.r.set(self.in_flight_key, int(count))

    def in_flight(self) -> int | None:
        value = self.r.get(self.in_flight_key)
        return None if value is None else int(value)

    def commit_version(self, record: VersionRecord, entry_ids: list[str], folded: list[FoldedUpdate],
                       keep: int) -> None:
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
                forgotten = record.version - keep  # versions and bases no update may use any more
                for base, ids in _by_base(folded).items():
                    if base > forgotten:
                        pipe.sadd(self.folded_prefix + str(base), *ids)
                if entry_ids:
                    pipe.xack(self.stream, GROUP, *entry_ids).xdel(self.stream, *entry_ids)
                    pipe.hdel(self.attempts_key, *entry_ids)
                if forgotten >= 0:
                    pipe.delete(self.version_prefix + str(forgotten), self.folded_prefix + str(forgotten))
                legacy_done = self._legacy_folded_since is not None and forgotten >= self._legacy_folded_since
                if legacy_done:
                    pipe.delete(self.legacy_folded_key)
                if not self.cluster:  # a cluster pipeline refuses PUBLISH: sent right after EXEC instead
                    pipe.publish(self.channel, record.version)
                pipe.execute()
                if self.cluster:
                    self.r.publish(self.channel, record.version)
                if legacy_done:
                    self._legacy_folded_since = None
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

    def is_folded(self, update_id: str, base_version: int) -> bool:
        if self.r.sismember(self.folded_prefix + str(base_version), update_id):
            return True
        return self._legacy_folded_since is not None and bool(self.r.sismember(self.legacy_folded_key, update_id))

    def rejected_counts(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.r.hgetall(self.rejected_key).items()}

    def note_devices(self, fields_by_device: dict[str, dict[str, Any]]) -> None:
        if not fields_by_device:
            return
        devices = list(fields_by_device)
        merged = {}
        for device, raw in zip(devices, self.r.hmget(self.devices_key, devices)):
            merged[device] = json.dumps({**(json.loads(raw) if raw else {}), **fields_by_device[device]}, sort_keys=True)
        self.r.hset(self.devices_key, mapping=merged)

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


def _by_base(folded: list[FoldedUpdate]) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = {}
    for base, update_id in folded:
        groups.setdefault(base, []).append(update_id)
    return groups


def _rename_untagged_keys(r: redis.Redis, federation: str) -> None:
    """Move a federation's keys from before the hash tag (`edgefed:<federation>:...`) under `key_prefix`,
    once: only when the untagged federation exists and the tagged one does not (RENAME keeps the stream's
    consumer group and its pending entries)."""
    old, new = f"edgefed:{federation}:", key_prefix(federation)
    if not r.exists(old + "latest") or r.exists(new + "latest"):
        return
    pattern = "".join("\\" + c if c in "*?[]\\" else c for c in old) + "*"
    for key in r.scan_iter(match=pattern, count=1000):
        r.rename(key, new + key.decode()[len(old):])


def _entry(entry: tuple, redelivered: bool = False) -> BufferedUpdate:
    """A stream entry; one not written by `append_update` reads as an empty update, which the opener refuses."""
    entry_id, fields = entry
    try:
        meta = json.loads(fields.get(b"meta", b"{}"))
    except (ValueError, UnicodeDecodeError):
        meta = {}
    return BufferedUpdate(entry_id.decode(), fields.get(b"payload", b""), meta if isinstance(meta, dict) else {},
                          redelivered)
