"""Crash safety: SIGKILL the aggregator at random points against a real Redis.

A producer keeps appending sealed updates (and some duplicate deliveries) to
the federation's buffer while the aggregation worker is killed five times and
restarted. Afterwards every acknowledged update is in exactly one version, the
duplicates are counted once, and the final global adapter is exactly the
initial one plus each version's mean delta.
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


def test_sigkill_at_random_points_loses_nothing_and_counts_nothing_twice(tmp_path, redis_server):
    federation = f"recovery-{os.getpid()}"
    enrol_devices(tmp_path / "keys", 4)
    overrides = [f"state-store={redis_server}", f"federation={federation}", f"key-dir={tmp_path / 'keys'}",
                 f"buffer-size={BUFFER}", f"max-versions={UPDATES // BUFFER}", "max-staleness=1000",
                 "staleness-weight=constant", "update-codec=none", *SMALL_MODEL]
    cfg = EdgefedConfig().with_overrides(overrides)
    store = open_state_store(redis_server, federation)
    devices = device_credentials(tmp_path / "keys", 4)

    worker = WorkerProcess(overrides)
    deadline = time.time() + 60
    while store.latest_version() is None:  # version 0 is published by the first start
        assert time.time() < deadline, "the worker never published version 0"
        time.sleep(0.1)
    shapes = {n: t.shape for n, t in decode(store.load_version(0).adapter).items()}

    sent: dict[str, OrderedDict] = {}
    duplicates = 0

    def produce() -> None:
        nonlocal duplicates
        for i in range(UPDATES):
            delta = random_delta(shapes, seed=i)
            # Some are delivered twice (not the last ones: the run ends when the last version is in,
            # and would leave a late duplicate unread).
            twice = i % 7 == 3 and i < UPDATES - BUFFER
            sent[send_update(store, devices[i % 4], delta, "none", copies=2 if twice else 1)] = delta
            duplicates += twice
            time.sleep(0.4)

    producer = threading.Thread(target=produce)
    producer.start()
    recoveries = []
    rng = random.Random(0)
    begin = time.time()
    for kill_at in sorted(rng.uniform(1.0, 0.25 * UPDATES) for _ in range(KILLS)):
        time.sleep(max(0.0, kill_at - (time.time() - begin)))
        worker.kill()
        worker = WorkerProcess(overrides)
        recovery = worker.first_version_after_start(timeout=60)
        assert recovery is not None and recovery < 60, "a restarted aggregator must resume within 60 s"
        recoveries.append(recovery)
    producer.join()
    assert worker.proc.wait(timeout=120) == 0
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
    print(f"recoveries (s): {[round(r, 2) for r in recoveries]}")
    store.close()
