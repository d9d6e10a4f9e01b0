"""Crash safety: SIGKILL the aggregator at random points against a real Redis.

A producer keeps appending sealed updates (and some duplicate deliveries) to
the federation's buffer while the aggregation worker is killed five times and
restarted. Afterwards every acknowledged update is in exactly one version, the
duplicates counted once, and the final global adapter is exactly the initial
one plus each version's mean delta.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from common.codec import decode, encode
from common.config import EdgefedConfig
from common.envelope import read_context
from common.keys import load_aggregator_key, load_device_key
from common.state_store import open_state_store
from edge.update_sender import DeviceCredentials, seal_update
from simulations.prepare import enrol_devices

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SMALL_MODEL = ["hidden-size=32", "num-layers=1", "num-heads=2", "intermediate-size=64", "image-size=32",
               "n-mels=32", "audio-frames=32"]
BUFFER, UPDATES, KILLS = 3, 60, 5


class Worker:
    """The aggregation worker as a child process, its JSON event lines collected by a thread."""

    def __init__(self, overrides: list[str]) -> None:
        args = [sys.executable, "-m", "cloud.fedbuff_worker", *[a for o in overrides for a in ("--set", o)]]
        self.started = time.time()
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.events: list[dict] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.events.append(json.loads(line))

    def first_version_after_start(self, timeout: float) -> float | None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            versions = [e for e in self.events if e["event"] == "version"]
            if versions:
                return versions[0]["time"] - self.started
            if self.proc.poll() is not None and not self.reader.is_alive():
                raise AssertionError(f"the worker exited with {self.proc.returncode}: {self.proc.stderr.read()[-3000:]}")
            time.sleep(0.05)
        return None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


def test_sigkill_at_random_points_loses_nothing_and_counts_nothing_twice(tmp_path, redis_server):
    federation = f"recovery-{os.getpid()}"
    enrol_devices(tmp_path / "keys", 4)
    overrides = [f"state-store={redis_server}", f"federation={federation}", f"key-dir={tmp_path / 'keys'}",
                 f"buffer-size={BUFFER}", f"max-versions={UPDATES // BUFFER}", "max-staleness=1000",
                 "staleness-weight=constant", "update-codec=none", *SMALL_MODEL]
    cfg = EdgefedConfig().with_overrides(overrides)
    store = open_state_store(redis_server, federation)
    aggregator_public = load_aggregator_key(tmp_path / "keys" / "cloud").public_key()
    devices = [DeviceCredentials(f"client-{i}", load_device_key(tmp_path / "keys" / "devices" / f"client-{i}"),
                                 aggregator_public) for i in range(4)]

    worker = Worker(overrides)
    assert worker.first_version_after_start(timeout=0) is None
    deadline = time.time() + 60
    while store.latest_version() is None:  # version 0 is published by the first start
        assert time.time() < deadline, "the worker never published version 0"
        time.sleep(0.1)
    shapes = {n: t.shape for n, t in decode(store.load_version(0).adapter).items()}

    sent: dict[str, OrderedDict] = {}
    duplicates = 0
    rng = random.Random(0)

    def produce() -> None:
        nonlocal duplicates
        for i in range(UPDATES):
            g = torch.Generator().manual_seed(i)
            delta = OrderedDict((n, torch.randn(s, generator=g) * 0.01) for n, s in shapes.items())
            sealed = seal_update(encode(delta, "none"), devices[i % 4], federation, store.latest_version())
            store.append_update(sealed, {"num-examples": 1.0})  # acknowledged from here on
            sent[read_context(sealed).update_id] = delta
            if i % 7 == 3 and i < UPDATES - BUFFER:  # the transport delivers this one twice (not the last:
                # the run ends when the last version is in, and would leave a late duplicate unread)
                store.append_update(sealed, {"num-examples": 1.0})
                duplicates += 1
            time.sleep(0.4)

    producer = threading.Thread(target=produce)
    producer.start()
    recoveries = []
    begin = time.time()
    for kill_at in sorted(rng.uniform(1.0, 0.25 * UPDATES) for _ in range(KILLS)):
        time.sleep(max(0.0, kill_at - (time.time() - begin)))
        worker.kill()
        worker = Worker(overrides)
        recovery = worker.first_version_after_start(timeout=60)
        assert recovery is not None and recovery < 60, "a restarted aggregator must resume within 60 s"
        recoveries.append(recovery)
    producer.join()
    assert worker.proc.wait(timeout=120) == 0
    assert worker.events[-1] == {**worker.events[-1], "event": "done", "version": UPDATES // BUFFER}

    folded: list[str] = []
    expected = decode(store.load_version(0).adapter)
    for v in range(1, cfg.max_versions + 1):
        record = store.load_version(v)
        ids = record.meta["update_ids"]
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
