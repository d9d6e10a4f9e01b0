"""Crash safety: SIGKILL the aggregator at chosen points of the run against a real Redis.

A producer appends sealed updates (and some duplicate deliveries) to the
federation's buffer while the aggregation worker is killed five times and
restarted. The kills are driven by the run's own events, not by the clock:
kill j happens once the store has committed version k_j (the k's drawn from a
seeded RNG, increasing, well below max-versions) and the producer has
appended j_extra more updates (0 .. buffer-size: none read yet, some read and
held, or a version being folded). The producer never runs more than one version
ahead of the next kill point, so however slowly a restarted worker starts, the
run cannot finish before the last kill. After each restart the test waits for
the restarted worker's first committed version. Afterwards every acknowledged
update is in exactly one version, the duplicates are counted once, and the
final global adapter is exactly the initial one plus each version's mean delta.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import OrderedDict

import pytest
import torch

from edgefed.cloud.state.store import open_state_store
from edgefed.common.config import EdgefedConfig
from edgefed.common.wire.codec import decode
from edgefed.simulations.prepare import enrol_devices
from tests.aggregation_harness import WorkerProcess, device_credentials, random_delta, send_update

pytestmark = pytest.mark.integration

SMALL_MODEL = ["hidden-size=32", "num-layers=1", "num-heads=2", "intermediate-size=64", "image-size=32",
               "n-mels=32", "audio-frames=32"]
BUFFER, UPDATES, KILLS = 3, 60, 5
MAX_VERSIONS = UPDATES // BUFFER
DEADLINE_S = 180.0  # for each awaited event: generous, a loaded machine is slow but gets there


def _wait(what: str, check, worker: WorkerProcess, errors: list = (), timeout: float = DEADLINE_S) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not check():
        assert not errors, f"the producer failed while waiting for {what}: {errors!r}"
        if worker.exited():
            raise AssertionError(f"the worker exited while waiting for {what}: {worker.stderr_tail()}")
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.02)


def test_sigkill_at_random_points_loses_nothing_and_counts_nothing_twice(tmp_path, redis_server):
    federation = f"recovery-{os.getpid()}"
    enrol_devices(tmp_path / "keys", 4)
    overrides = [f"state-store={redis_server}", f"federation={federation}", f"key-dir={tmp_path / 'keys'}",
                 f"buffer-size={BUFFER}", f"max-versions={MAX_VERSIONS}", "max-staleness=1000",
                 "staleness-weight=constant", "update-codec=none", *SMALL_MODEL]
    cfg = EdgefedConfig().with_overrides(overrides)
    assert cfg.max_versions == MAX_VERSIONS
    store = open_state_store(redis_server, federation)
    devices = device_credentials(tmp_path / "keys", 4)

    # Kill points: after version k, with `extra` more updates appended (read or not, or a version being folded).
    rng = random.Random(0)
    kill_versions = sorted(rng.sample(range(1, MAX_VERSIONS - 5), KILLS))  # distinct: each restart has work to do
    kill_points = [(k, rng.randint(0, BUFFER)) for k in kill_versions]

    worker = WorkerProcess(overrides)
    _wait("version 0 (published by the first start)", lambda: store.latest_version() is not None, worker)
    shapes = {n: t.shape for n, t in decode(store.load_version(0).adapter).items()}

    sent: dict[str, OrderedDict] = {}
    duplicates = 0
    appended = 0  # distinct updates appended so far
    # The producer may append update i only while i < allowed: one version past the next kill point,
    # so the versions committed before that kill are at most k + 1 (and never the last one).
    gate = threading.Condition()
    allowed = (kill_points[0][0] + 1) * BUFFER
    failures: list[BaseException] = []

    def produce() -> None:
        nonlocal duplicates, appended
        try:
            for i in range(UPDATES):
                with gate:
                    assert gate.wait_for(lambda i=i: i < allowed, timeout=4 * DEADLINE_S), f"update {i} never allowed"
                delta = random_delta(shapes, seed=i)
                # Some are delivered twice (not the last ones: the run ends when the last version is in,
                # and would leave a late duplicate unread).
                twice = i % 7 == 3 and i < UPDATES - BUFFER
                sent[send_update(store, devices[i % 4], delta, "none", copies=2 if twice else 1)] = delta
                duplicates += twice
                appended += 1
                time.sleep(0.4)  # pacing only: spreads arrivals so kills land between reads; nothing depends on it
        except BaseException as err:  # noqa: BLE001 - reported by the test thread
            failures.append(err)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    recoveries = []
    killed_at = []
    for j, (k, extra) in enumerate(kill_points):
        _wait(f"version {k} and {k * BUFFER + extra} updates appended (kill {j + 1})",
              lambda k=k, extra=extra: store.latest_version() >= k and appended >= k * BUFFER + extra, worker, failures)
        worker.kill()
        at_kill = store.latest_version()
        killed_at.append(at_kill)
        assert at_kill < MAX_VERSIONS, "the run must not be complete at a kill"
        with gate:  # the next stretch of updates: up to one version past the next kill point (all of them after the last)
            allowed = (kill_points[j + 1][0] + 1) * BUFFER if j + 1 < KILLS else UPDATES
            gate.notify_all()
        worker = WorkerProcess(overrides)
        recovery = worker.first_version_after_start(timeout=DEADLINE_S)
        assert recovery is not None, f"the aggregator restarted after kill {j + 1} never committed a version"
        # How fast it resumes is a performance claim, measured by benchmarks/bench_async.py (recovery_s):
        # here, on a machine of any load, what must hold is that it resumes where the store says.
        assert worker.versions()[0] == at_kill + 1, "the restarted aggregator continues from the store's latest version"
        recoveries.append(recovery)
    producer.join(timeout=4 * DEADLINE_S)
    assert not producer.is_alive() and not failures, failures
    assert worker.wait(timeout=DEADLINE_S) == 0, worker.stderr_tail()
    assert worker.events[-1]["event"] == "done" and worker.events[-1]["version"] == cfg.max_versions

    folded: list[str] = []
    expected = decode(store.load_version(0).adapter)
    for v in range(1, cfg.max_versions + 1):
        ids = store.load_version(v).meta["update_ids"]
        folded.extend(ids)
        expected = OrderedDict((n, t + sum(sent[u][n] for u in ids) / len(ids)) for n, t in expected.items())
    assert len(folded) == len(set(folded)), "an update was counted twice"
    assert set(folded) == set(sent), "an acknowledged update was lost"
    assert store.rejected_counts().get("replayed", 0) == duplicates
    assert store.buffer_depth() == 0
    final = decode(store.load_version(cfg.max_versions).adapter)
    for name, value in expected.items():
        assert torch.allclose(final[name], value, atol=1e-5), name
    print(f"kill points (version, extra updates): {kill_points}; versions at the kills: {killed_at}; "
          f"recoveries (s): {[round(r, 2) for r in recoveries]}")
    store.close()
