"""Drive the aggregation worker from outside: a child process to kill, and a stream of sealed updates.

Used by tests/test_aggregator_recovery.py, benchmarks/bench_async.py and benchmarks/bench_scale.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from edgefed.cloud.state.store import StateStore
from edgefed.common.keys import load_aggregator_key, load_device_key
from edgefed.common.wire.codec import encode
from edgefed.common.wire.envelope import read_context
from edgefed.edge.update_sender import DeviceCredentials, seal_update

ROOT = Path(__file__).resolve().parents[1]


class WorkerProcess:
    """`python -m edgefed.cloud.aggregation.worker` as a child process; its JSON event lines collected by a thread.

    Its stderr is drained by another thread (a full pipe would block the worker) and kept for error messages.
    """

    def __init__(self, overrides: list[str]) -> None:
        args = [sys.executable, "-m", "edgefed.cloud.aggregation.worker", *[a for o in overrides for a in ("--set", o)]]
        self.started = time.time()
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.events: list[dict] = []
        self.stderr_lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self._stderr_reader = threading.Thread(target=lambda: self.stderr_lines.extend(self.proc.stderr), daemon=True)
        self._stderr_reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.events.append(json.loads(line))

    def versions(self) -> list[int]:
        """The versions this process has committed so far, in order."""
        return [e["version"] for e in list(self.events) if e["event"] == "version"]

    def exited(self) -> bool:
        """The process has exited and every line it wrote has been read."""
        return self.proc.poll() is not None and not self.reader.is_alive()

    def stderr_tail(self, chars: int = 3000) -> str:
        self._stderr_reader.join(timeout=5 if self.proc.poll() is not None else 0)
        return "".join(self.stderr_lines)[-chars:]

    def _died(self) -> RuntimeError:
        return RuntimeError(f"the worker exited with {self.proc.returncode} (events {self.events[-3:]}): "
                            f"{self.stderr_tail()}")

    def first_version_after_start(self, timeout: float) -> float | None:
        """Seconds from this process's start to its first committed version (None on timeout)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            versions = [e for e in list(self.events) if e["event"] == "version"]
            if versions:
                return versions[0]["time"] - self.started
            if self.exited():
                raise self._died()
            time.sleep(0.02)
        return None

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit and for its last lines to be read; its exit code."""
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=30)
        self._stderr_reader.join(timeout=30)
        assert not self.reader.is_alive(), "the worker exited but its stdout was not closed"
        return code

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.wait(timeout=30)


def device_credentials(key_root: Path, devices: int) -> list[DeviceCredentials]:
    aggregator_public = load_aggregator_key(key_root / "cloud").public_key()
    return [DeviceCredentials(f"client-{i}", load_device_key(key_root / "devices" / f"client-{i}"), aggregator_public)
            for i in range(devices)]


def random_delta(shapes: dict[str, torch.Size], seed: int, scale: float = 0.01) -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return OrderedDict((n, torch.randn(s, generator=g) * scale) for n, s in shapes.items())


def send_update(store: StateStore, device: DeviceCredentials, delta: dict[str, torch.Tensor], codec: str,
                copies: int = 1, num_examples: float = 1.0) -> str:
    """Seal `delta` against the store's latest version and append it (`copies` > 1: a duplicate delivery)."""
    sealed = seal_update(encode(delta, codec), device, store.federation, store.latest_version() or 0, num_examples)
    for _ in range(copies):
        store.append_update(sealed, {})
    return read_context(sealed).update_id


@dataclass
class Throughput:
    updates_per_s: float
    updates: int
    buffer_size: int
    seconds_by_phase: dict[str, float]  # time spent in each part of the aggregator's work (all updates)


# What the aggregator's work is made of, by the method that does it (timed around each call).
PHASES = {
    "read": ("store", "read_updates"),
    "open-bookkeeping": ("store", "begin_open"),  # the crash-loop counter, one round trip per update
    "opened-bookkeeping": ("store", "opened"),
    "verify-open-decode-check": ("opener", "open"),
    "fold": (None, "aggregate"),  # the LoRA aggregation of the buffer
    "sign-version": ("mac", "sign"),
    "commit": ("store", "commit_version"),
    "device-records": ("store", "note_devices"),
}


def aggregator_throughput(redis_url: str, key_root: Path, updates: int, buffer_size: int | None = None,
                          devices: int = 4) -> Throughput:
    """verify + open + decode + fold + commit throughput of a FedBuffAggregator on `redis_url`, over `updates`
    sealed updates of the default adapter (default codec) buffered up front, with `buffer_size` updates a
    version; the time of each part is measured around its calls."""
    from edgefed.cloud.aggregation import fedbuff
    from edgefed.cloud.aggregation.fedbuff import FedBuffAggregator
    from edgefed.common.config import EdgefedConfig
    from edgefed.common.model.lora import build_lora_model, get_adapter_state
    from edgefed.common.run_dir import new_run_id

    # All updates are sealed against version 0 up front, so none may count as too stale here.
    cfg = EdgefedConfig().replace(state_store=redis_url, federation=f"throughput-{new_run_id()}",
                                  key_dir=str(key_root), max_staleness=updates)
    if buffer_size is not None:
        cfg = cfg.replace(buffer_size=buffer_size)
    initial = get_adapter_state(build_lora_model(cfg))
    aggregator = FedBuffAggregator.from_config(cfg, initial)
    aggregator.resume()
    credentials = device_credentials(key_root, devices)
    shapes = {n: t.shape for n, t in initial.items()}
    for i in range(updates):  # the devices' side, not timed
        send_update(aggregator.store, credentials[i % devices], random_delta(shapes, seed=i), cfg.update_codec)
    spent = dict.fromkeys(PHASES, 0.0)
    owners = {"store": aggregator.store, "opener": aggregator.opener, "mac": aggregator.mac}
    restore = []
    for phase, (owner, name) in PHASES.items():
        target = fedbuff if owner is None else owners[owner]
        original = getattr(target, "aggregate" if owner is None else name)

        def timed(*args, _original=original, _phase=phase, **kwargs):  # noqa: ANN002, ANN003, ANN202
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                spent[_phase] += time.perf_counter() - start

        attribute = "aggregate" if owner is None else name
        setattr(target, attribute, timed)
        restore.append((target, attribute, original, owner is None))
    start = time.perf_counter()
    folded = 0
    try:
        while folded < updates - updates % cfg.buffer_size:
            folded += sum(len(e.nodes) for e in aggregator.step())
            if time.perf_counter() - start > 900:
                raise RuntimeError(f"only {folded} of {updates} updates folded in 900 s")
        elapsed = time.perf_counter() - start
    finally:
        for target, attribute, original, module_level in restore:
            if module_level:
                setattr(target, attribute, original)
            else:
                delattr(target, attribute)  # the instance attribute shadowed the method
        aggregator.store.close()
    spent["other"] = max(elapsed - sum(spent.values()), 0.0)
    return Throughput(folded / elapsed, folded, cfg.buffer_size, {k: round(v, 3) for k, v in spent.items()})


def fold_through_store(store: StateStore, updates: int, per_version: int, keep: int,
                       measure_at: tuple[int, ...]) -> dict[int, int]:
    """`updates` entries through a Redis store's buffer (appended, read, folded `per_version` a version with
    `keep` versions kept, bases 0-2 versions stale as an async fleet's are); Redis's `used_memory` (after
    MEMORY PURGE) when the count of folded updates reaches each of `measure_at`."""
    from edgefed.cloud.state.store import FoldedUpdate, VersionRecord

    payload = bytes(600)  # the size of a small sealed update; it leaves Redis when folded
    first = (store.latest_version() or 0) + 1
    if store.latest_version() is None:
        store.commit_version(VersionRecord(0, b"adapter-0", meta={}), [], [], keep=keep)
    used = {}
    for n, version in enumerate(range(first, first + updates // per_version), start=1):
        base = max(version - 1 - version % 3, 0)
        with store.r.pipeline(transaction=False) as pipe:
            for _ in range(per_version):
                pipe.xadd(store.stream, {"payload": payload, "meta": "{}"})
            pipe.execute()
        entries = store.read_updates(per_version)
        if len(entries) != per_version:
            raise RuntimeError(f"read {len(entries)} of the {per_version} entries just appended")
        folded = [FoldedUpdate(base, f"{version}-{i}-{'x' * 24}") for i in range(per_version)]
        record = VersionRecord(version, f"adapter-{version}".encode(), meta={"update_ids": [f.update_id for f in folded]})
        store.commit_version(record, [e.entry_id for e in entries], folded, keep=keep)
        if n * per_version in measure_at:
            store.r.memory_purge()
            used[n * per_version] = int(store.r.info("memory")["used_memory"])
    return used
