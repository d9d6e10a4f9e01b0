"""The edge agent's parts that run without a cloud: its config, the inbox watcher, device checks.

The whole agent against a real SuperLink is tests/test_fleet_deployment.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from edgefed.cloud.grid.work_sizing import work_for
from edgefed.common.config import ConfigError, EdgefedConfig
from edgefed.common.data.clip_manifest import read_manifest
from edgefed.common.keys import DeviceRegistry, init_keys, node_auth_paths
from edgefed.common.wire.capabilities import capabilities_of
from edgefed.edge.agent.config import AgentConfig, write_agent_config
from edgefed.edge.agent.edge_agent import AgentError, EdgeAgent, check_device
from edgefed.edge.agent.inbox import ERRORS_FILE, InboxWatcher


def _config(tmp_path: Path, **extra: object) -> AgentConfig:
    cloud = tmp_path / "cloud-keys"
    init_keys("cloud", cloud)
    path = write_agent_config(tmp_path / "device", "device-7", "127.0.0.1:9093", "127.0.0.1:9300", None, cloud)
    with open(path, "a") as fh:
        for key, value in extra.items():
            fh.write(f"{key} = {json.dumps(value)}\n")
    return AgentConfig.from_file(path)


def test_agent_config_resolves_paths_against_its_file_and_names_bad_keys(tmp_path):
    cfg = _config(tmp_path, cores=2)
    assert cfg.key_dir == (tmp_path / "device" / "keys").resolve() and cfg.state_dir.is_absolute()
    assert cfg.node_config()["device-cores"] == 2 and cfg.node_config()["device-memory-mb"] > 0
    assert cfg.node_config()["train-manifest"] == str(cfg.state_dir / "train.jsonl")
    bad = tmp_path / "bad.toml"
    bad.write_text((tmp_path / "device" / "edge.toml").read_text() + "colour = 3\n")
    with pytest.raises(ConfigError, match="unknown agent config key 'colour'"):
        AgentConfig.from_file(bad)
    bad.write_text('device-id = "x"\n')
    with pytest.raises(ConfigError, match="missing superlink"):
        AgentConfig.from_file(bad)
    bad.write_text((tmp_path / "device" / "edge.toml").read_text() + "[features]\nimage-size = 100\n")
    with pytest.raises(ConfigError, match="multiple of patch-size"):
        AgentConfig.from_file(bad)


def test_agent_config_takes_media_limits_and_an_extraction_memory_limit(tmp_path):
    cfg = _config(tmp_path, **{"extract-memory-mb": 2048})
    assert cfg.extract_memory_mb == 2048 and cfg.feature_config().media_limits == EdgefedConfig().media_limits
    base = (tmp_path / "device" / "edge.toml").read_text()
    limited = tmp_path / "limited.toml"
    limited.write_text(base + "[media-limits]\nmax-media-seconds = 30\nmax-media-pixels = 2073600\n")
    limits = AgentConfig.from_file(limited).feature_config().media_limits
    assert (limits.max_media_seconds, limits.max_media_pixels) == (30.0, 2073600)
    limited.write_text(base + "[media-limits]\nimage-size = 64\n")
    with pytest.raises(ConfigError, match=r"\[media-limits\] takes max-media-duration-s"):
        AgentConfig.from_file(limited)
    limited.write_text(base + "[media-limits]\nmax-media-frames = 0\n")
    with pytest.raises(ConfigError, match="max-media-frames"):
        AgentConfig.from_file(limited)
    limited.write_text(base.replace("extract-memory-mb = 2048", "extract-memory-mb = 64"))
    with pytest.raises(ConfigError, match="extract-memory-mb must be at least"):
        AgentConfig.from_file(limited)


def test_a_device_without_keys_gets_the_command_that_makes_them(tmp_path):
    cfg = _config(tmp_path)
    with pytest.raises(AgentError, match="edgefed keys init --role edge"):
        check_device(cfg)
    init_keys("edge", cfg.key_dir)
    check_device(cfg)
    shutil.rmtree(cfg.cloud_keys)
    with pytest.raises(AgentError, match="cloud's public keys"):
        EdgeAgent(cfg).start()


def test_node_auth_key_is_an_openssh_p384_pair_flower_can_read(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    init_keys("edge", tmp_path / "keys")
    private, public = node_auth_paths(tmp_path / "keys")
    key = load_ssh_private_key(private.read_bytes(), None)
    assert isinstance(key.curve, ec.SECP384R1) and oct(private.stat().st_mode & 0o777) == "0o600"
    assert load_ssh_public_key(public.read_bytes()).public_numbers() == key.public_key().public_numbers()


def test_inbox_extracts_labelled_media_once_records_failures_and_resumes(tmp_path, small_dataset):
    cfg = _config(tmp_path, **{"heldout-share": 0.3})
    clips = read_manifest(small_dataset)[:6]
    for entry in clips:
        dest = cfg.inbox / entry.label / entry.path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(entry.path, dest)
    broken = cfg.inbox / clips[0].label / "broken.mp4"
    broken.write_bytes(b"\x00not a video" * 64)
    shutil.copy(clips[1].path, cfg.inbox / "unlabelled.mp4")

    watcher = InboxWatcher(cfg)
    state = watcher.scan_once()
    assert (state.extracted, state.failed, state.unlabelled, state.backlog) == (6, 1, 1, 0)
    train, heldout = read_manifest(cfg.train_manifest), read_manifest(cfg.heldout_manifest)
    assert len(train) + len(heldout) == 6 and heldout, "both splits are written"
    assert {e.label for e in train + heldout} <= set(EdgefedConfig().label_names)
    assert len(list(cfg.cache_dir.rglob("*.safetensors"))) == 6  # the ClientApp finds every clip cached
    errors = [json.loads(line) for line in (cfg.state_dir / ERRORS_FILE).read_text().splitlines()]
    assert [e["path"] for e in errors] == [str(broken)] and errors[0]["reason"]

    again = InboxWatcher(cfg)  # a restarted agent: nothing is decoded twice, the failure is not retried
    assert (again.scan_once().extracted, again.state.failed) == (0, 0)
    assert len(again.train) + len(again.heldout) == 6
    broken.write_bytes(b"\x00still not a video" * 64)  # a changed file is tried again
    assert again.scan_once().failed == 1


def test_the_aggregator_sizes_work_from_reported_capabilities():
    cfg = EdgefedConfig(batch_size=8, client_threads=1)
    assert work_for(cfg, {}) == {}
    assert work_for(cfg, {"device-cores": 4.0, "device-memory-mb": 8192.0}) == {"client-threads": 4}
    # memory is planned by the device itself, which knows its model (tests/test_training_plan.py)
    assert work_for(cfg, {"device-cores": 32.0, "device-memory-mb": 1024.0}) == {"client-threads": 8}
    assert capabilities_of({"device-cores": 2, "train-loss": 0.3, "device-memory-mb": "x"}) == {"device-cores": 2.0}


def test_the_device_registry_sees_enrolments_made_by_another_process(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = tmp_path / "registry.json"
    aggregator_view = DeviceRegistry(path)
    DeviceRegistry(path).register("device-1", Ed25519PrivateKey.generate().public_key())  # `edgefed cloud enrol`
    assert "device-1" in aggregator_view and aggregator_view.get("device-1") is not None
    DeviceRegistry(path).revoke("device-1")
    assert "device-1" not in aggregator_view


def test_agent_follows_its_supernode_through_restarts_refusals_and_rejoins(tmp_path, monkeypatch):
    """A stand-in SuperNode process per start: connects as node N and runs until the test lets it exit
    (it creates the start's release file), or is refused and exits at once."""
    import sys

    import edgefed.edge.agent.edge_agent as agent_module

    cfg = _config(tmp_path)
    agent = EdgeAgent(cfg)
    agent.cfg.state_dir.mkdir(parents=True)
    agent.inbox = InboxWatcher(cfg)
    script = tmp_path / "supernode.py"
    script.write_text("import os, sys, time\nprint(sys.argv[1], flush=True)\n"
                      "while sys.argv[2] != '-' and not os.path.exists(sys.argv[2]):\n    time.sleep(0.05)\n")
    release = [tmp_path / f"release-{n}" for n in range(3)]
    lines = iter([("SuperNode ID: 41", release[0]), ("SuperNode ID: 41", release[1]),
                  (agent_module.REFUSED_MARK, "-"), (agent_module.REFUSED_MARK, "-"), ("SuperNode ID: 57", release[2])])
    monkeypatch.setattr(agent, "supernode_command",
                        lambda port: [sys.executable, str(script), *map(str, next(lines))])
    monkeypatch.setattr(agent_module, "REJOIN_RETRY_S", 0.0)
    monkeypatch.setattr(agent, "_backoff", 0.0)

    def step_until(state: str, timeout: float = 120.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            agent._check()
            if agent.state == state:
                return
            time.sleep(0.1)
        raise AssertionError(f"agent stayed {agent.state}, expected {state}")

    try:
        agent._start_supernode()
        step_until("connected")
        assert agent.node_id == 41
        release[0].touch()  # the SuperNode exits
        step_until("reconnecting")  # the SuperNode exited: restarted, its node id read again
        step_until("connected")
        assert agent.node_id == 41 and agent.starts == 2
        release[1].touch()
        step_until("rejoining")  # refused after having been connected: the old session is still open
        monkeypatch.setattr(agent_module, "REJOIN_WINDOW_S", 0.0)
        step_until("refused")  # refused for longer than a session lives: revoked, rotated or never enrolled
        step_until("connected")  # re-enrolled: a new node id
        assert agent.node_id == 57
    finally:
        if agent.supernode is not None:
            agent.supernode.kill()


def test_hostile_inbox_files_fail_alone_and_the_inbox_thread_survives(tmp_path, small_dataset):
    """Scripts under media names and a 12000x12000 PNG frame land among good clips: the inbox thread (as
    the agent runs it) records each hostile file with its reason, extracts the good ones, and is still
    running. (Limits set in `[media-limits]`: test_agent_config_takes_media_limits_...)"""
    import threading
    import time

    from edgefed.simulations.media_cases import write_concat_script, write_png_mov, write_self_concat

    cfg = _config(tmp_path, **{"heldout-share": 0.0, "scan-every-s": 0.5})
    label = EdgefedConfig().label_names[0]
    folder = cfg.inbox / label
    folder.mkdir(parents=True)
    good = []
    for entry in read_manifest(small_dataset)[:3]:
        good.append(folder / entry.path.name)
        shutil.copy(entry.path, good[-1])
    hostile = {
        write_concat_script(folder / "holiday.mp4", good[0], repeats=2000): "'concat' is not an allowed container",
        write_self_concat(folder / "loop.mp4"): "'concat' is not an allowed container",
        write_png_mov(folder / "poster.mov", 12000, 12000): "12000x12000 is over max-media-pixels",
    }

    watcher = InboxWatcher(cfg)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), name="inbox", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 600
        while watcher.state.extracted + watcher.state.failed < len(good) + len(hostile):
            assert thread.is_alive(), "the inbox thread died"
            assert time.monotonic() < deadline, f"inbox stuck at {watcher.state}"
            time.sleep(0.2)
        assert thread.is_alive()
        errors = {Path(e["path"]): e["reason"]
                  for e in map(json.loads, (cfg.state_dir / ERRORS_FILE).read_text().splitlines())}
        assert set(errors) == set(hostile), errors
        for path, expected in hostile.items():
            assert expected in errors[path], (path, errors[path])
        assert {e.path for e in read_manifest(cfg.train_manifest)} == set(good)
        assert watcher.state.failed == len(hostile) and watcher.state.extracted == len(good)
    finally:
        stop.set()
        thread.join(120)
    assert not thread.is_alive()
    assert not watcher.sandbox.running  # the extraction process ended with the inbox thread


def _peak_vm_mb() -> bytes:  # run in an extraction process
    status = Path("/proc/self/status").read_text()
    return str(int(next(line for line in status.splitlines() if line.startswith("VmPeak:")).split()[1]) // 1024).encode()


def test_an_extraction_that_outgrows_its_memory_limit_fails_one_inbox_file(tmp_path, small_dataset):
    """With `[media-limits]` letting a 12000x12000 PNG frame through, `extract-memory-mb` is what stops it:
    that file fails with the reason, the agent's process never holds the frame, the next file is extracted."""
    from edgefed.edge.agent.inbox import prepare_extraction_process
    from edgefed.edge.dataset import clip_feature_bytes
    from edgefed.edge.media.sandbox import ExtractionSandbox
    from edgefed.simulations.media_cases import write_png_mov

    clips = read_manifest(small_dataset)[:1]
    measuring = ExtractionSandbox(4096, prepare_extraction_process)
    try:
        measuring.call("warm-up", 120, clip_feature_bytes, str(clips[0].path), EdgefedConfig(), 0)
        baseline_mb = int(measuring.call("vm", 60, _peak_vm_mb))
    finally:
        measuring.stop()
    cfg = _config(tmp_path, **{"heldout-share": 0.0, "extract-memory-mb": baseline_mb + 256})
    toml = cfg.state_dir.parent / "edge.toml"
    toml.write_text(toml.read_text() + "[media-limits]\nmax-media-pixels = 1000000000\n")
    cfg = AgentConfig.from_file(toml)
    folder = cfg.inbox / clips[0].label
    folder.mkdir(parents=True)
    poster = write_png_mov(folder / "a_poster.mov", 12000, 12000)  # scanned first
    shutil.copy(clips[0].path, folder / clips[0].path.name)

    watcher = InboxWatcher(cfg)
    try:
        state = watcher.scan_once()
    finally:
        watcher.close()
    assert (state.extracted, state.failed) == (1, 1)
    (error,) = [json.loads(line) for line in (cfg.state_dir / ERRORS_FILE).read_text().splitlines()]
    assert error["path"] == str(poster) and "memory" in error["reason"].lower(), error
    assert [e.path for e in read_manifest(cfg.train_manifest)] == [folder / clips[0].path.name]


def _exit_at_start() -> None:  # an extraction process's `prepare` that never gets it ready
    os._exit(3)


def test_an_inbox_file_waits_while_no_extraction_process_starts(tmp_path, small_dataset, monkeypatch):
    """A child that cannot start is the device's trouble, not the file's: nothing is recorded as failed,
    and the next scan extracts the file."""
    from edgefed.edge.agent.inbox import prepare_extraction_process

    cfg = _config(tmp_path)
    clip = read_manifest(small_dataset)[0]
    (cfg.inbox / clip.label).mkdir(parents=True)
    shutil.copy(clip.path, cfg.inbox / clip.label / clip.path.name)
    watcher = InboxWatcher(cfg)
    monkeypatch.setattr(watcher.sandbox, "prepare", _exit_at_start)
    try:
        state = watcher.scan_once()
        assert (state.extracted, state.failed, state.backlog) == (0, 0, 1)
        assert not (cfg.state_dir / ERRORS_FILE).exists()
        monkeypatch.setattr(watcher.sandbox, "prepare", prepare_extraction_process)
        assert watcher.scan_once().extracted == 1
    finally:
        watcher.close()
