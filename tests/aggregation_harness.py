"""Drive the aggregation worker from outside: a child process to kill, and a stream of sealed updates.

Used by tests/test_aggregator_recovery.py and benchmarks/bench_async.py.
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
