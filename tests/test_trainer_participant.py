"""The global trainer beside the aggregator, as separate processes on a real redis-server.

Devices keep sending updates; the trainer joins with its own sealed updates,
which enter versions with their staleness; SIGKILL of the trainer does not
stop aggregation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from edgefed.cloud.state.store import open_state_store
from edgefed.common.config import EdgefedConfig
from edgefed.common.data.features import FeatureSet, save_features
from edgefed.common.keys import DeviceRegistry, init_keys, load_device_key
from edgefed.common.wire.codec import decode
from edgefed.simulations.prepare import enrol_devices
from tests.aggregation_harness import WorkerProcess, device_credentials, random_delta, send_update

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
MAX_VERSIONS = 40
AHEAD, HOLD = 4, MAX_VERSIONS - 10  # how far devices may run ahead of the trainer before the test lets them finish
SMALL = ["hidden-size=32", "num-layers=1", "num-heads=2", "intermediate-size=64", "image-size=32", "n-mels=32",
         "audio-frames=32", "num-keyframes=2"]


def _features(path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    n = 32
    labels = torch.randint(0, 4, (n,), generator=g)
    data = FeatureSet(torch.randint(0, 256, (n, 2, 3, 32, 32), dtype=torch.uint8, generator=g),
                      torch.ones(n, 2, dtype=torch.bool), (torch.randn(n, 2, 32, 32, generator=g) - 6).half(),
                      torch.ones(n, 2, dtype=torch.bool), labels)
    save_features(data, path)
    return path


def _wait(predicate, timeout_s: float, what: str) -> None:  # noqa: ANN001
    deadline = time.time() + timeout_s
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("kill_trainer", [False, True])
def test_federation_with_the_trainer_runs_to_completion_even_if_the_trainer_dies(tmp_path, redis_server, kill_trainer):
    federation = f"trainer-{os.getpid()}-{kill_trainer}"
    keys = tmp_path / "keys"
    enrol_devices(keys, 2)
    init_keys("edge", keys / "devices" / "cloud-trainer")  # the trainer is enrolled like a device
    DeviceRegistry(keys / "cloud" / "registry.json").register(
        "cloud-trainer", load_device_key(keys / "devices" / "cloud-trainer").public_key())
    overrides = [f"state-store={redis_server}", f"federation={federation}", f"key-dir={keys}", "buffer-size=2",
                 f"max-versions={MAX_VERSIONS}", "staleness-weight=poly0.5", "update-codec=none", "trainer-participant-steps=40",
                 "trainer-update-weight=50", "batch-size=4", *SMALL]
    store = open_state_store(redis_server, federation)
    worker = WorkerProcess(overrides)
    trainer = subprocess.Popen(
        [sys.executable, "-m", "edgefed.cloud.training.participant", "--features", str(_features(tmp_path / "f.safetensors")),
         "--key-dir", str(keys / "devices" / "cloud-trainer"), *[a for o in overrides for a in ("--set", o)]],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    trainer_events: list[dict] = []
    threading.Thread(target=lambda: [trainer_events.append(json.loads(line)) for line in trainer.stdout
                                     if line.startswith("{")], daemon=True).start()
    stop = threading.Event()
    try:
        _wait(lambda: store.latest_version() is not None, 60, "version 0")
        shapes = {n: t.shape for n, t in decode(store.load_version(0).adapter).items()}
        devices = device_credentials(keys, 2)

        versions = lambda: [e for e in worker.events if e["event"] == "version"]  # noqa: E731
        with_trainer = lambda: [v for v in versions() if "cloud-trainer" in v["nodes"]]  # noqa: E731
        trainer_bases = lambda: [e["base_version"] for e in trainer_events if e["event"] == "update"]  # noqa: E731
        released = threading.Event()

        def allowed() -> bool:
            """Devices may publish while the trainer trains, but never finish the run before the test has seen
            what it waits for: at most AHEAD versions past the trainer's newest base, and below HOLD."""
            if released.is_set():
                return True
            if len(trainer_bases()) > len(with_trainer()):  # a trainer update waits in the buffer for a partner
                return True
            return len(versions()) < min(max(trainer_bases(), default=0) + AHEAD, HOLD)

        def produce() -> None:
            i = 0
            while not stop.is_set():
                if allowed():
                    send_update(store, devices[i % 2], random_delta(shapes, seed=i), "none")
                    i += 1
                time.sleep(0.02)

        threading.Thread(target=produce, daemon=True).start()
        staleness_of = lambda v: v["staleness"][v["nodes"].index("cloud-trainer")]  # noqa: E731
        # Devices publish versions while it trains: its updates arrive stale and are discounted as such.
        _wait(lambda: len(with_trainer()) >= 2 and any(staleness_of(v) > 0 for v in with_trainer()), 300,
              "two versions with the trainer's update, one of them stale")
        assert trainer.poll() is None, trainer.stderr.read()
        trained_on = set(trainer_bases())
        for v in with_trainer():  # staleness = versions published between its base and its aggregation
            assert v["version"] - 1 - staleness_of(v) in trained_on

        if kill_trainer:
            trainer.send_signal(signal.SIGKILL)
            trainer.wait(timeout=10)
            at_kill = len(versions())
            assert at_kill < MAX_VERSIONS - 5, "the trainer must die mid-run"
        released.set()
        _wait(lambda: any(e["event"] == "done" for e in worker.events), 120, "the federation to complete")
        assert [v["version"] for v in versions()] == list(range(1, MAX_VERSIONS + 1))
        if kill_trainer:
            sent = sum(e["event"] == "update" for e in trainer_events)
            folded = sum(v["nodes"].count("cloud-trainer") for v in versions())
            assert folded <= sent, "only what the trainer sent before it died is folded"
        else:
            assert trainer.poll() is None, "the trainer stayed attached to the end"
    finally:
        stop.set()
        if trainer.poll() is None:
            trainer.kill()
        worker.kill()
        store.close()


def test_simulation_with_the_cloud_trainer_attached(tmp_path, redis_server):
    """`edgefed simulate` with the trainer beside the aggregator: its updates enter versions; killed mid-run (after
    its first update), the federation still completes. (A trainer left alive is the harness test's case above: the
    simulation with it asserted a subset of this one's checks, for 30 s of CI.)"""
    from edgefed.simulations.prepare import prepare
    from edgefed.simulations.runner import run_federation
    from edgefed.simulations.synthetic import SyntheticSpec

    spec = SyntheticSpec(num_clips=40, width=96, height=72, fps=8, duration_s=2.0, shots=2, seed=9)
    base = EdgefedConfig(out_dir=str(tmp_path / "runs"), run_id="with-trainer", max_versions=10, buffer_size=2,
                         local_epochs=1, min_clients=2, seed=9, export_every=0, state_store=redis_server,
                         federation=f"sim-trainer-{os.getpid()}", trainer_participant_steps=4)
    data = prepare(tmp_path / "data", base, num_clients=2, alpha=1.0, synthetic=spec)
    # the cloud's own clips: here the first client's training split stands in for them
    cloud = tmp_path / "cloud.safetensors"
    from edgefed.common.data.clip_manifest import read_manifest
    from edgefed.edge.dataset import build_features

    features, _ = build_features(read_manifest(data.layout.client_train(0)), base, data.layout.cache)
    save_features(features, cloud)
    cfg = base.replace(data_dir=str(data.layout.root), cloud_trainer_features=str(cloud))
    run_dir = tmp_path / "runs" / "with-trainer"
    killed: list[int] = []

    def kill_after_first_update() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            log = run_dir / "trainer.log"
            if log.exists() and '"event": "update"' in log.read_text():
                os.kill(int((run_dir / "trainer.pid").read_text()), signal.SIGKILL)
                killed.append(1)
                return
            time.sleep(0.1)

    threading.Thread(target=kill_after_first_update, daemon=True).start()
    run = run_federation(cfg, num_clients=2)

    versions = run.read_metrics()
    assert [v["version"] for v in versions] == list(range(1, 11))
    assert run.read_json("summary.json")["versions"] == 10
    sent = (run_dir / "trainer.log").read_text().count('"event": "update"')
    folded = sum(v["trainer_updates"] for v in versions)
    assert 0 < folded <= sent
    assert killed, "the trainer was killed mid-run"


def test_an_ffa_participant_update_leaves_every_lora_a_unchanged(tmp_path, redis_server):
    """lora-aggregation=ffa averages B exactly only if nobody moves A: the cloud trainer must not either."""
    from edgefed.cloud.aggregation.fedbuff import FedBuffAggregator
    from edgefed.cloud.training.participant import TRAINER_ID, participate
    from edgefed.common.data.features import load_features
    from edgefed.common.model.lora import build_lora_model, get_adapter_state

    keys = tmp_path / "keys"
    enrol_devices(keys, 1)
    init_keys("edge", keys / "devices" / TRAINER_ID)
    DeviceRegistry(keys / "cloud" / "registry.json").register(
        TRAINER_ID, load_device_key(keys / "devices" / TRAINER_ID).public_key())
    cfg = EdgefedConfig().with_overrides([
        f"state-store={redis_server}", f"federation=ffa-{os.getpid()}", f"key-dir={keys}", "lora-aggregation=ffa",
        "update-codec=none", "trainer-participant-steps=5", "batch-size=4", "learning-rate=0.05", *SMALL])
    aggregator = FedBuffAggregator.from_config(cfg, get_adapter_state(build_lora_model(cfg)))
    aggregator.resume()  # publishes version 0, which the participant trains on
    data = load_features(_features(tmp_path / "f.safetensors"))
    assert participate(cfg, data, keys / "devices" / TRAINER_ID, keys / "cloud", threading.Event(), max_updates=1,
                       emit=lambda line: None) == 1
    [entry] = aggregator.store.read_updates(10)
    opened = aggregator.opener.open(entry.payload, aggregator.global_)  # the aggregator's own gate
    assert opened.context.node == TRAINER_ID
    a_names = [n for n in opened.delta if ".lora_A." in n]
    b_names = [n for n in opened.delta if ".lora_B." in n]
    assert a_names and len(a_names) == len(b_names)
    assert {n: int(torch.count_nonzero(opened.delta[n])) for n in a_names} == dict.fromkeys(a_names, 0)
    assert any(torch.count_nonzero(opened.delta[n]) > 0 for n in b_names), "B must have been trained"
    aggregator.store.close()
