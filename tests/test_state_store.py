"""The state store contract, on both backends (Redis is a real redis-server)."""

from __future__ import annotations

import threading
import time

import pytest

from edgefed.cloud.state.store import FoldedUpdate, StaleAggregator, StateStoreError, VersionRecord, open_state_store


@pytest.fixture(params=["memory", "redis"])
def store_factory(request: pytest.FixtureRequest):
    """Opens stores on one backend; the same federation name reopens the same state (Redis)."""
    name = f"fed-{request.node.name}".replace("[", "-").replace("]", "")
    opened = []

    def factory(federation: str = name):
        url = "memory://" if request.param == "memory" else request.getfixturevalue("redis_server")
        store = open_state_store(url, federation)
        opened.append(store)
        return store

    factory.backend = request.param
    yield factory
    for store in opened:
        store.close()


def _version(v: int, ids: list[str] = ()) -> VersionRecord:
    return VersionRecord(v, adapter=f"adapter-{v}".encode(), meta={"update_ids": list(ids)})


def test_buffer_commit_and_reject(store_factory) -> None:
    store = store_factory()
    assert store.latest_version() is None
    store.commit_version(_version(0), [], [], keep=3)
    ids = [store.append_update(f"u{i}".encode(), {"n": i}) for i in range(4)]
    assert store.buffer_depth() == 4
    got = store.read_updates(10)
    assert [e.payload for e in got] == [b"u0", b"u1", b"u2", b"u3"] and got[2].meta == {"n": 2}
    assert store.read_updates(10) == []  # handed out once per process
    store.reject(ids[3], "bad-signature")
    store.commit_version(_version(1, ["a", "b"]), ids[:2], [FoldedUpdate(0, "a"), FoldedUpdate(0, "b")], keep=3)
    assert store.buffer_depth() == 1
    assert store.latest_version() == 1 and store.load_version(1).adapter == b"adapter-1"
    assert store.is_folded("a", 0) and not store.is_folded("c", 0) and not store.is_folded("a", 1)
    assert store.rejected_counts() == {"bad-signature": 1}


def test_old_versions_are_forgotten(store_factory) -> None:
    store = store_factory()
    for v in range(5):
        store.commit_version(_version(v), [], [], keep=2)
    assert store.load_version(4) is not None and store.load_version(3) is not None
    assert store.load_version(2) is None


def test_commit_must_follow_the_latest_version(store_factory) -> None:
    store = store_factory()
    store.commit_version(_version(0), [], [], keep=3)
    with pytest.raises(StaleAggregator):
        store.commit_version(_version(0), [], [], keep=3)
    with pytest.raises(StaleAggregator):
        store.commit_version(_version(2), [], [], keep=3)


def test_redis_pending_entries_survive_a_new_connection(redis_server: str) -> None:
    first = open_state_store(redis_server, "fed-restart")
    first.commit_version(_version(0), [], [], keep=3)
    ids = [first.append_update(f"u{i}".encode(), {}) for i in range(3)]
    assert len(first.read_updates(10)) == 3
    first.commit_version(_version(1, ["x"]), ids[:1], [FoldedUpdate(0, "x")], keep=3)
    first.close()  # "crash": u1 and u2 were read but never committed

    second = open_state_store(redis_server, "fed-restart")
    late = second.append_update(b"u3", {})
    again = second.read_updates(10)
    assert [e.payload for e in again] == [b"u1", b"u2"]  # the backlog first
    assert all(e.redelivered for e in again)  # the aggregator counts its attempts to open these
    fresh = second.read_updates(10)
    assert [e.entry_id for e in fresh] == [late] and not fresh[0].redelivered
    assert second.latest_version() == 1
    second.close()


def _watching(store) -> bool:  # noqa: ANN001
    """Someone is subscribed to the store's version events (Redis: a channel subscriber; memory: a waiter)."""
    if hasattr(store, "r"):
        return store.r.pubsub_numsub(store.channel)[0][1] >= 1
    return len(store._lock._waiters) >= 1


def test_watch_versions_sees_commits(store_factory) -> None:
    store = store_factory()
    store.commit_version(_version(0), [], [], keep=3)
    seen: list[int] = []
    watcher = store_factory(store.federation)
    source = watcher if store_factory.backend == "redis" else store

    def watch() -> None:
        versions = source.watch_versions(timeout_s=60.0)  # a generous quiet period: it stops once it has seen 2
        for version in versions:
            seen.append(version)
            if version == 2:
                break
        versions.close()

    thread = threading.Thread(target=watch)
    thread.start()
    deadline = time.monotonic() + 60
    while not _watching(store):  # commits before the subscription would not be seen
        assert time.monotonic() < deadline and thread.is_alive(), "the watcher never subscribed"
        time.sleep(0.01)
    store.commit_version(_version(1), [], [], keep=3)
    store.commit_version(_version(2), [], [], keep=3)
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert seen[-1] == 2


def test_open_attempts_and_quarantine(store_factory) -> None:
    store = store_factory()
    store.commit_version(_version(0), [], [], keep=3)
    kept, gone = store.append_update(b"poison", {"n": 1}), store.append_update(b"fine", {"n": 2})
    assert [e.entry_id for e in store.read_updates(10)] == [kept, gone]
    assert [store.begin_open(kept) for _ in range(3)] == [1, 2, 3]
    store.opened(kept)  # opened without incident: the count starts again
    assert store.begin_open(kept) == 1
    assert store.begin_open(gone, opened=kept) == 1 and store.begin_open(kept) == 1  # cleared on the way
    store.opened(gone)
    store.quarantine(kept, "crashed-opening", "details")
    [entry] = store.quarantined()
    assert entry["entry_id"] == kept and entry["payload"] == b"poison" and entry["reason"] == "crashed-opening"
    assert store.rejected_counts() == {"quarantined": 1} and store.buffer_depth() == 1
    assert store.begin_open(gone) == 1
    store.commit_version(_version(1, ["g"]), [gone], [FoldedUpdate(0, "g")], keep=3)
    assert store.buffer_depth() == 0 and store.begin_open(gone) == 1  # the count went with the entry


def test_a_version_keeps_its_mac(store_factory) -> None:
    store = store_factory()
    record = _version(0)
    record.mac = b"\x01" * 32
    store.commit_version(record, [], [], keep=3)
    assert store.load_version(0).mac == b"\x01" * 32


def test_devices_merge(store_factory) -> None:
    store = store_factory()
    store.note_device("d1", {"updates": 1})
    store.note_device("d1", {"last_seen": 5.0})
    assert store.devices() == {"d1": {"updates": 1, "last_seen": 5.0}}


def test_bad_urls_are_clear_errors() -> None:
    with pytest.raises(StateStoreError, match="unknown state store"):
        open_state_store("postgres://x", "f")
    with pytest.raises(StateStoreError, match="cannot reach Redis"):
        open_state_store("redis://127.0.0.1:1/0", "f")


def test_folded_ids_are_forgotten_with_their_base_version(store_factory) -> None:
    """keep=3 (max-staleness 2): an id folded from base 0 answers as folded while base 0 is accepted, and is
    forgotten at version 3, when base 0 is refused as too stale anyway."""
    store = store_factory()
    store.commit_version(_version(0), [], [], keep=3)
    store.commit_version(_version(1, ["a"]), [], [FoldedUpdate(0, "a")], keep=3)
    store.commit_version(_version(2, ["b"]), [], [FoldedUpdate(1, "b")], keep=3)
    assert store.is_folded("a", 0) and store.is_folded("b", 1)
    store.commit_version(_version(3), [], [], keep=3)
    assert not store.is_folded("a", 0) and store.is_folded("b", 1)
    store.commit_version(_version(4, ["c"]), [], [FoldedUpdate(1, "c")], keep=3)  # folded as base 1 leaves
    assert not store.is_folded("b", 1) and not store.is_folded("c", 1)


UPDATES, PER_VERSION, KEEP = 100_000, 100, 5


def test_redis_memory_stays_flat_over_100k_folded_updates(tmp_path) -> None:
    """100,000 updates through the buffer: appended, read, folded 100 a version into 1,000 versions with
    max-staleness 4. Before folded ids were forgotten with their base, the folded set alone grew by ~7 MB
    over these updates; now what Redis holds after 100,000 is what it held after 20,000."""
    from tests.aggregation_harness import fold_through_store
    from tests.servers import RedisServer

    with RedisServer(tmp_path, fsync="no") as server:
        store = open_state_store(server.url, "flat")
        used = fold_through_store(store, UPDATES, PER_VERSION, KEEP, measure_at=(20_000, UPDATES))
        kept_ids = sum(store.r.scard(k) for k in store.r.scan_iter(match=store.folded_prefix + "*"))
        assert store.buffer_depth() == 0 and kept_ids <= KEEP * PER_VERSION
        assert store.latest_version() == UPDATES // PER_VERSION
        assert store.load_version(UPDATES // PER_VERSION - KEEP) is None  # old versions went too
        growth = used[UPDATES] - used[20_000]
        assert growth < 256 * 1024, f"Redis grew by {growth / 1024:.0f} KB from 20,000 to 100,000 folded updates"
        store.close()


def test_keys_from_before_the_hash_tag_are_moved_and_their_flat_folded_set_still_refuses_replays(
        redis_server: str) -> None:
    import redis

    from edgefed.cloud.state.redis_store import key_prefix

    raw = redis.Redis.from_url(redis_server)
    old = "edgefed:legacy:"
    raw.xgroup_create(old + "updates", "aggregator", id="0", mkstream=True)
    pending = raw.xadd(old + "updates", {"payload": b"p", "meta": "{}"})
    raw.xreadgroup("aggregator", "aggregator", {old + "updates": ">"})  # read, never folded: pending
    raw.hset(old + "version:4", mapping={"adapter": b"a4", "optimizer": b"", "meta": "{}", "mac": b""})
    raw.set(old + "latest", 4)
    raw.sadd(old + "folded", "old-id")

    store = open_state_store(redis_server, "legacy")
    assert not raw.exists(old + "latest") and raw.exists(key_prefix("legacy") + "latest")
    assert store.latest_version() == 4 and store.load_version(4).adapter == b"a4"
    assert [e.entry_id for e in store.read_updates(10)] == [pending.decode()]  # the pending list moved with it
    assert store.is_folded("old-id", 3)
    for v in (5, 6):
        store.commit_version(_version(v), [], [], keep=3)
    assert store.is_folded("old-id", 4)  # base 4 is still accepted at version 6 (keep 3: max-staleness 2)
    store.commit_version(_version(7), [], [], keep=3)
    assert not raw.exists(key_prefix("legacy") + "folded") and not store.is_folded("old-id", 4)
    store.close()


def test_the_store_runs_on_a_redis_cluster(tmp_path) -> None:
    """Three masters, slots spread: every key of a federation carries its hash tag, so a commit's
    MULTI/EXEC and the WATCH that fences a second aggregator work as on one server."""
    from tests.servers import RedisCluster

    with RedisCluster(tmp_path) as cluster:
        store = open_state_store(cluster.url, "clustered")
        store.commit_version(_version(0), [], [], keep=3)
        ids = [store.append_update(f"u{i}".encode(), {"n": i}) for i in range(3)]
        assert [e.payload for e in store.read_updates(10)] == [b"u0", b"u1", b"u2"]
        store.reject(ids[2], "bad-signature")
        store.commit_version(_version(1, ["a"]), ids[:2], [FoldedUpdate(0, "a")], keep=3)
        assert store.latest_version() == 1 and store.buffer_depth() == 0 and store.is_folded("a", 0)
        store.note_device("d1", {"updates": 1})
        assert store.devices() == {"d1": {"updates": 1}} and store.rejected_counts() == {"bad-signature": 1}
        other = open_state_store(cluster.url, "clustered")
        other.commit_version(_version(2), [], [], keep=3)
        with pytest.raises(StaleAggregator):
            store.commit_version(_version(2), [], [], keep=3)
        store.close()
        other.close()
