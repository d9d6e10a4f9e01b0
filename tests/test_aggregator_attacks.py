"""Attacks on the asynchronous aggregator, each performed for real.

An attacker who holds one device key (or who can reach the transport's unsigned
fields) tries to take over the average with a claimed weight, to poison the global
model with NaN, to crash-loop the aggregator with entries it cannot open, and one
who can write to Redis tries to hand a restarted aggregator a version of their own.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from collections import OrderedDict
from pathlib import Path

import pytest
import redis
import torch
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefed.cloud.aggregation.fedbuff import MAX_OPEN_ATTEMPTS, FedBuffAggregator
from edgefed.cloud.aggregation.policy import FedBuffPolicy, polynomial
from edgefed.cloud.aggregation.server_optimizer import ServerSGD
from edgefed.cloud.aggregation.update_opener import UpdateOpener
from edgefed.cloud.aggregation.version_window import StalenessWindow
from edgefed.cloud.state.redis_store import key_prefix
from edgefed.cloud.state.store import StateStoreError, open_state_store, store_for
from edgefed.cloud.state.version_mac import TamperedVersion, VersionMac
from edgefed.common.config import EdgefedConfig
from edgefed.common.keys import DeviceRegistry, init_keys, load_aggregator_key
from edgefed.common.wire import codec, envelope
from edgefed.common.wire.codec import encode
from edgefed.common.wire.envelope import UpdateContext, seal
from edgefed.simulations.prepare import enrol_devices
from tests.aggregation_harness import WorkerProcess, device_credentials, random_delta, send_update
from tests.servers import RedisServer

INITIAL = OrderedDict(w=torch.zeros(4), b=torch.zeros(2))
DEVICE = Ed25519PrivateKey.generate()


def _sealed_aggregator(tmp_path: Path, store=None, weight=None, buffer_size: int = 2) -> FedBuffAggregator:
    if not (tmp_path / "cloud").exists():  # a restarted aggregator keeps the cloud's keys
        init_keys("cloud", tmp_path / "cloud")
        DeviceRegistry(tmp_path / "cloud" / "registry.json").register("dev", DEVICE.public_key())
    registry = DeviceRegistry(tmp_path / "cloud" / "registry.json")
    store = store or open_state_store("memory://", "fed")
    window = StalenessWindow(4, store.is_folded)
    opener = UpdateOpener("fed", load_aggregator_key(tmp_path / "cloud"), registry, window, max_norm=100.0, clip=False)
    agg = FedBuffAggregator(store, opener, window, FedBuffPolicy(buffer_size, weight or polynomial(0.5)),
                            ServerSGD(1.0), "fedavg", INITIAL, VersionMac(b"k" * 32, "fed"))
    agg.resume()
    return agg


def _update(agg: FedBuffAggregator, value: float, examples: float, unsigned_meta: dict) -> None:
    delta = OrderedDict(w=torch.full((4,), value), b=torch.zeros(2))
    context = UpdateContext("fed", "dev", agg.version, UpdateContext.new_update_id(), examples)
    agg.ingest(seal(encode(delta, "none"), context, agg.opener.aggregator_key.public_key(), DEVICE), unsigned_meta)


@pytest.mark.parametrize("claim", [1e9, -99.999, float("nan")])
def test_the_unsigned_example_count_beside_an_update_weighs_nothing(tmp_path, claim):
    """Reply metrics travel unsigned: a claim there must not move the average (it used to take it over)."""
    agg = _sealed_aggregator(tmp_path)
    _update(agg, +1.0, examples=10, unsigned_meta={"num-examples": claim})
    _update(agg, -1.0, examples=10, unsigned_meta={"num-examples": 1.0})
    (event,) = agg.step()
    assert event.version == 1
    assert torch.allclose(agg.global_["w"], torch.zeros(4))  # the signed weights are equal: the mean is 0


def test_a_non_finite_aggregate_is_never_committed(tmp_path):
    """Finite updates under a broken weighting rule: the NaN global is refused, not committed and shipped."""
    agg = _sealed_aggregator(tmp_path, weight=lambda staleness: float("inf"))
    _update(agg, +1.0, examples=10, unsigned_meta={})
    _update(agg, -1.0, examples=10, unsigned_meta={})
    assert agg.step() == []
    assert agg.version == 0 and agg.store.latest_version() == 0
    assert agg.store.rejected_counts() == {"non-finite-aggregate": 2}
    assert agg.store.buffer_depth() == 0
    assert torch.equal(agg.global_["w"], INITIAL["w"])


class _GapInTheGate(UpdateOpener):
    """Stands for a bug the gate's checks miss: some bytes make opening raise something unexpected."""

    def open(self, data, reference, plain_context=None):  # noqa: ANN001, ANN201
        if data == b"trips a bug":
            raise TypeError("an error nobody anticipated")
        return super().open(data, reference, plain_context)


def test_an_entry_the_gate_cannot_handle_is_quarantined_not_retried(tmp_path):
    agg = _sealed_aggregator(tmp_path)
    agg.opener.__class__ = _GapInTheGate
    agg.ingest(b"trips a bug", {})
    _update(agg, +1.0, examples=10, unsigned_meta={})
    _update(agg, +1.0, examples=10, unsigned_meta={})
    (event,) = agg.step()  # the loop goes on
    assert event.version == 1 and event.rejected == {"quarantined": 1}
    [kept] = agg.store.quarantined()
    assert kept["payload"] == b"trips a bug" and kept["reason"] == "unopenable" and "TypeError" in kept["detail"]
    assert agg.store.buffer_depth() == 0


class _Died(BaseException):
    """The aggregator process ended while it was opening an entry (no handler runs, as under SIGKILL)."""


class _DiesOnPoison(UpdateOpener):
    def open(self, data, reference, plain_context=None):  # noqa: ANN001, ANN201
        if data == b"kills the process":
            raise _Died
        return super().open(data, reference, plain_context)


def test_fresh_entries_cost_no_attempt_write_and_an_entry_that_kills_three_processes_is_quarantined(
        tmp_path, redis_server):
    """Opening a fresh entry writes nothing; an entry a dead process left behind comes back redelivered and its
    attempts are counted from then on, the first (unwritten) one included: the fourth process quarantines
    the entry that killed the first three, and folds the others."""
    federation = f"dies-{os.getpid()}"

    def restarted() -> FedBuffAggregator:
        agg = _sealed_aggregator(tmp_path, store=open_state_store(redis_server, federation))
        agg.opener.__class__ = _DiesOnPoison
        return agg

    agg = restarted()
    _update(agg, +1.0, examples=1, unsigned_meta={})
    agg.ingest(b"kills the process", {})
    _update(agg, +3.0, examples=1, unsigned_meta={})
    attempts = agg.store.attempts_key
    for process in range(3):
        with pytest.raises(_Died):
            agg.step()
        if process == 0:
            assert agg.store.r.hlen(attempts) == 0  # the fresh update opened before it cost no write
        agg.store.close()
        agg = restarted()
    (event,) = agg.step()
    assert event.version == 1 and event.rejected == {"quarantined": 1}
    [kept] = agg.store.quarantined()
    assert kept["payload"] == b"kills the process" and kept["reason"] == "crashed-opening"
    assert torch.equal(agg.global_["w"], torch.full((4,), 2.0))  # both good updates, weighed alike
    assert agg.store.buffer_depth() == 0 and agg.store.r.hlen(attempts) == 0
    agg.store.close()


# --- against a real redis-server and the standalone worker process ----------------------------------

SMALL = ["hidden-size=32", "num-layers=1", "num-heads=2", "intermediate-size=64", "image-size=32", "n-mels=32",
         "audio-frames=32"]


def _worker_setup(tmp_path: Path, redis_server: str, federation: str, versions: int) -> tuple[list[str], object]:
    enrol_devices(tmp_path / "keys", 2)
    overrides = [f"state-store={redis_server}", f"federation={federation}", f"key-dir={tmp_path / 'keys'}",
                 "buffer-size=2", f"max-versions={versions}", "update-codec=none", *SMALL]
    return overrides, open_state_store(redis_server, federation)


def _forged_envelope(device_key: Ed25519PrivateKey, federation: str, node: str, epk_hex: str) -> bytes:
    head = json.dumps({"run": federation, "node": node, "base": 0, "update": "u" * 32, "examples": 1,
                       "epk": epk_hex}).encode()
    body = b"".join([envelope.MAGIC, bytes([envelope.VERSION]), struct.pack("<H", len(head)), head, b"\0" * 12,
                     struct.pack("<I", 32), b"\0" * 32])
    return body + device_key.sign(body)


def _codec_bytes(tensors: list[dict], payload: bytes, spec: str = "none") -> bytes:
    head = json.dumps({"tensors": tensors}).encode()
    return b"".join([codec.MAGIC, bytes([codec.VERSION]), struct.pack("<H", len(spec)), spec.encode(),
                     struct.pack("<I", len(head)), head, payload])


def _wait_for_version_0(worker: WorkerProcess, store) -> None:  # noqa: ANN001
    import time

    deadline = time.time() + 120
    while store.latest_version() is None:
        assert not worker.exited(), worker.stderr_tail()
        assert time.time() < deadline, "the worker never published version 0"
        time.sleep(0.1)


@pytest.mark.integration
def test_poison_updates_are_typed_rejections_and_the_worker_never_crashes(tmp_path, redis_server):
    """A low-order key, a shape bomb, a decompression bomb and a malformed stream entry among good updates:
    each is refused and counted, and the aggregation process completes (it used to crash and crash again)."""
    federation = f"poison-{os.getpid()}"
    overrides, store = _worker_setup(tmp_path, redis_server, federation, versions=1)
    worker = WorkerProcess(overrides)
    _wait_for_version_0(worker, store)
    good = device_credentials(tmp_path / "keys", 2)
    key = good[0].signing_key
    store.append_update(_forged_envelope(key, federation, "client-0", "00" * 32), {})  # low-order point
    shape_bomb = _codec_bytes([{"name": "x", "shape": [2**64, 0], "dtype": "float32"}], b"")
    inflating = zstandard.ZstdCompressor(level=19).compress(b"\0" * (256 << 20))
    zip_bomb = _codec_bytes([{"name": "x", "shape": [8192, 8192], "dtype": "float32"}], inflating, "zstd")
    for payload in (shape_bomb, zip_bomb):
        context = UpdateContext(federation, "client-0", 0, UpdateContext.new_update_id(), 1.0)
        store.append_update(seal(payload, context, good[0].aggregator_public, key), {})
    redis.Redis.from_url(redis_server).xadd(key_prefix(federation) + "updates", {"junk": b"no payload field"})
    shapes = {n: t.shape for n, t in codec.decode(store.load_version(0).adapter).items()}
    for i in range(2):
        send_update(store, good[i], random_delta(shapes, seed=i), "none")
    assert worker.wait(timeout=300) == 0, worker.stderr_tail()
    assert worker.versions() == [1]
    assert store.rejected_counts() == {
        "bad-key": 1,  # the low-order point
        "bad-payload": 1,  # the [2**64, 0] shape
        "wrong-tensors": 1,  # the decompression bomb, refused from its header before it is inflated
        "malformed": 1,  # the stream entry that is no sealed update at all
    }
    assert store.buffer_depth() == 0
    store.close()


@pytest.mark.integration
def test_an_entry_that_keeps_killing_the_aggregator_is_quarantined(tmp_path, redis_server):
    """Three aggregator processes died while opening this entry (a crash our checks did not foresee):
    the next one takes it out of the buffer, keeps it for inspection, and goes on."""
    federation = f"crashing-{os.getpid()}"
    overrides, store = _worker_setup(tmp_path, redis_server, federation, versions=1)
    worker = WorkerProcess(overrides)
    _wait_for_version_0(worker, store)
    worker.kill()
    devices = device_credentials(tmp_path / "keys", 2)
    shapes = {n: t.shape for n, t in codec.decode(store.load_version(0).adapter).items()}
    send_update(store, devices[0], random_delta(shapes, seed=0), "none")
    [deadly] = store.read_updates(10)  # what a process that died while opening it would have left behind
    for _ in range(MAX_OPEN_ATTEMPTS):
        store.begin_open(deadly.entry_id)
    store.close()
    store = open_state_store(redis_server, federation)
    for i in (1, 2):
        send_update(store, devices[i % 2], random_delta(shapes, seed=i), "none")
    worker = WorkerProcess(overrides)
    assert worker.wait(timeout=300) == 0, worker.stderr_tail()
    assert store.rejected_counts() == {"quarantined": 1}
    [kept] = store.quarantined()
    assert kept["entry_id"] == deadly.entry_id and kept["reason"] == "crashed-opening"
    assert kept["payload"] == deadly.payload
    assert store.buffer_depth() == 0
    assert len(store.load_version(1).meta["update_ids"]) == 2
    store.close()


def test_a_version_written_into_redis_by_someone_else_is_refused_on_resume(tmp_path, redis_server):
    """Whoever can write to Redis could overwrite `version:<v>`, which a restarted aggregator would resume
    from, sign and ship: the version's MAC under the cloud's state key refuses it."""
    federation = f"tamper-{os.getpid()}"
    enrol_devices(tmp_path / "keys", 1)
    cfg = EdgefedConfig().with_overrides([f"state-store={redis_server}", f"federation={federation}",
                                          f"key-dir={tmp_path / 'keys'}", "buffer-size=1", *SMALL])
    from edgefed.common.model.lora import build_lora_model, get_adapter_state

    initial = get_adapter_state(build_lora_model(cfg))
    first = FedBuffAggregator.from_config(cfg, initial)
    assert first.resume() == 0
    again = FedBuffAggregator.from_config(cfg, initial)
    assert again.resume() == 0  # untouched: resumes
    poisoned = OrderedDict((n, torch.full_like(t, 3.0)) for n, t in initial.items())
    raw = redis.Redis.from_url(redis_server)
    raw.hset(key_prefix(federation) + "version:0", "adapter", encode(poisoned, "none"))
    with pytest.raises(TamperedVersion, match="integrity"):
        FedBuffAggregator.from_config(cfg, initial).resume()
    raw.hdel(key_prefix(federation) + "version:0", "mac")  # a version without a MAC at all
    with pytest.raises(TamperedVersion):
        FedBuffAggregator.from_config(cfg, initial).resume()
    first.store.close()
    again.store.close()


def test_redis_with_a_password_from_a_file(tmp_path):
    (tmp_path / "redis").mkdir()
    with RedisServer(tmp_path / "redis", password="s3cret-pw") as server:
        secret = tmp_path / "redis.password"
        secret.write_text("s3cret-pw\n")
        secret.chmod(0o600)
        cfg = EdgefedConfig(state_store=server.url, federation="pw", state_store_password_file=str(secret))
        store = store_for(cfg)
        assert store.latest_version() is None
        store.close()
        with pytest.raises(StateStoreError, match="refused the password|NOAUTH|Authentication") as err:
            store_for(cfg.replace(state_store_password_file=""))  # no password: Redis refuses
        assert "s3cret" not in str(err.value)
        wrong = tmp_path / "wrong.password"
        wrong.write_text("guess")
        wrong.chmod(0o600)
        with pytest.raises(StateStoreError, match="refused the password") as err:
            store_for(cfg.replace(state_store_password_file=str(wrong)))
        assert "guess" not in str(err.value)
        secret.chmod(0o644)
        with pytest.raises(StateStoreError, match="readable or writable by everyone"):
            store_for(cfg)
        assert stat.S_IMODE(secret.stat().st_mode) == 0o644


def test_metrics_endpoints_bind_loopback_by_default():
    """Reachable on the loopback address only, unless metrics-bind says otherwise (e.g. 0.0.0.0 in a container)."""
    import socket
    import urllib.request

    from edgefed.cloud.metrics.prometheus import FederationMetrics
    from tests.servers import free_port

    port = free_port()
    metrics = FederationMetrics("fed").serve(port)
    try:
        assert b"edgefed_versions_total" in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.2", port), timeout=5).close()
    finally:
        metrics.close()
