"""End to end: a real fleet on 127.0.0.1 — redis-server, `edgefed cloud serve` and 3 `edgefed edge agent`s.

Every link is TLS (certificates from `edgefed certs`), SuperNode authentication
is on, devices are enrolled with `edgefed cloud enrol`, and each agent gets its
media through its inbox. The federation runs asynchronously over Flower's
SuperLink; one agent is killed (its whole process group, like a device losing
power) and restarted mid-run; a device whose node key was never enrolled is
refused; the aggregator's process is killed and the service resubmits it,
resuming from Redis. At the end every agent holds the newest signed INT8 model and
`edgefed infer` runs it on the device's media.

Every step waits for the event it needs (a state in a status file, a version in
the store, a counter on a Prometheus endpoint) with a generous deadline; nothing
depends on how fast this machine is. The aggregator is killed while the killed
device is still down, right after the federation has gone on without it, and the
device is restarted then: its rejoin (its old session takes about a minute to
expire) overlaps the resubmission, and the resumed aggregator hands work to
every online node, so the device is part of the rest of the run however long the
expiry takes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from edgefed.cloud.state.store import open_state_store
from edgefed.common.config import EdgefedConfig
from edgefed.common.keys import load_cloud_public
from edgefed.common.wire.model_manifest import MANIFEST_FILE, verify_manifest
from edgefed.simulations.prepare import fill_inboxes, prepare
from edgefed.simulations.synthetic import SyntheticSpec
from tests.servers import free_port, scrape

pytestmark = pytest.mark.integration

DEVICES = 3
VERSIONS = 8  # a hard-killed node can rejoin only after its session expires (about a minute)
EDGEFED = [sys.executable, "-m", "edgefed.cli"]


def _edgefed(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    done = subprocess.run([*EDGEFED, *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"edgefed {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        # Own process group: killing it takes the agent's SuperNode and ClientApps with it.
        return subprocess.Popen([*EDGEFED, *args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait(what: str, check, timeout: float, procs: list[subprocess.Popen] = ()):  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        for proc in procs:
            assert proc.poll() is None, f"{proc.args[3:5]} exited with {proc.returncode} while waiting for {what}"
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _scrape_or_none(port: int) -> dict | None:
    try:
        return scrape(port)
    except OSError:  # not listening (yet)
        return None


def _scraped_versions_at_least(port: int, versions: int) -> dict | None:
    """A scrape whose edgefed_versions_total has reached `versions` (else None: not yet, or not listening)."""
    sample = _scrape_or_none(port)
    return sample if sample is not None and sample[("edgefed_versions_total", ())] >= versions else None


def _dead(proc: psutil.Process) -> bool:
    """Gone, or a zombie: not our child, so its parent (the SuperLink) reaps it when it gets to it."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _metric_lines(run_dir: Path) -> list[dict]:
    """metrics.jsonl's complete version lines (a line being written is not one yet; the deployed model's
    evaluations have lines of their own)."""
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except OSError:
        return []
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return [line for line in lines if line.get("event", "round") == "round"]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_fleet_over_superlink_with_tls_node_auth_and_redis(tmp_path, redis_server):
    # --- the cloud's data, keys and certificates ------------------------------------------------
    cfg = EdgefedConfig(seed=5)
    spec = SyntheticSpec(num_clips=48, width=96, height=72, fps=8, duration_s=2.0, shots=2, seed=5)
    data = prepare(tmp_path / "data", cfg, num_clients=DEVICES, alpha=1.0, synthetic=spec, client_features=False)
    tls = tmp_path / "tls"
    _edgefed("certs", "--dir", str(tls), "--host", "127.0.0.1", "--host", "localhost")
    cloud_keys = data.layout.root / "keys" / "cloud"
    cloud_public = tmp_path / "cloud-public"  # what a device gets: the cloud's public keys only
    cloud_public.mkdir()
    for pub in cloud_keys.glob("*.pub"):
        shutil.copy(pub, cloud_public)

    superlink, model_service = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    cloud_metrics, device_metrics = free_port(), free_port()
    cloud_toml = tmp_path / "cloud.toml"
    cloud_toml.write_text("\n".join([
        'federation = "e2e"', f'state-store = "{redis_server}"', f'data-dir = "{data.layout.root}"',
        f'out-dir = "{tmp_path / "runs"}"', f'tls-dir = "{tls}"', f'superlink = "{superlink}"',
        f'model-service = "{model_service}"', f"metrics-port = {cloud_metrics}", f"min-clients = {DEVICES}", f"max-versions = {VERSIONS}",
        "buffer-size = 2", "export-every = 5", "local-epochs = 1", "seed = 5", "message-ttl-s = 120.0",
        # 16 central clips: one disagreement is 6%; the parity gate itself is tested in test_onnx_export
        "parity-min-agreement = 0.5",
    ]) + "\n")
    service_dir = tmp_path / "runs" / "e2e" / "service"
    run_dir = tmp_path / "runs" / "e2e"

    cloud = _start(["cloud", "serve", "--config", str(cloud_toml)], tmp_path / "cloud.log")
    agents: dict[str, subprocess.Popen] = {}
    store = None
    try:
        _wait("the cloud service", lambda: _json(service_dir / "service.json").get("state") == "running", 300, [cloud])

        # --- devices: keys made on the device, enrolled by the operator ------------------------------
        configs = {}
        for i in range(DEVICES + 1):
            device = f"device-{i}" if i < DEVICES else "rogue"
            folder = tmp_path / "devices" / device
            _edgefed("edge", "init", "--dir", str(folder), "--device-id", device, "--superlink", superlink,
                     "--model-service", model_service, "--ca-cert", str(tls / "ca.crt"), "--cloud-keys", str(cloud_public))
            config = folder / "edge.toml"
            with open(config, "a") as fh:  # one core each on this 2-core machine; extract at full speed
                fh.write("cores = 1\nextract-cpu-share = 1.0\nscan-every-s = 2.0\n")
                if device == "device-0":
                    fh.write(f"metrics-port = {device_metrics}\n")
            if i < DEVICES:
                _edgefed("cloud", "enrol", "--config", str(cloud_toml), "--device-id", device,
                         "--keys", str(config.parent / "keys"))
            configs[device] = config
        fill_inboxes(data.layout, DEVICES, tmp_path / "devices")  # the media each device recorded
        # the rogue gets no media: the SuperLink refuses its node key before any would be used
        for device, config in configs.items():
            agents[device] = _start(["edge", "agent", "--config", str(config)], config.parent / "agent.log")
        devices = [d for d in configs if d != "rogue"]

        def status(device: str) -> dict:
            return _json(configs[device].parent / "state" / "agent.json")

        # --- an unenrolled node key is refused by the SuperLink --------------------------------------
        _wait("the rogue device to be refused", lambda: status("rogue").get("state") == "refused", 300)
        assert status("rogue")["node_id"] is None
        _stop(agents.pop("rogue"))

        node_ids = {d: _wait(f"{d} to connect", lambda d=d: status(d).get("node_id"), 300, [cloud]) for d in devices}
        store = open_state_store(redis_server, "e2e")  # the versions as committed, read directly

        def version() -> int | None:
            """The store's version as `edgefed cloud status` reports it (None if it could not tell)."""
            try:
                out = subprocess.run([*EDGEFED, "cloud", "status", "--config", str(cloud_toml), "--json"],
                                     capture_output=True, text=True, timeout=120)
                return int(json.loads(out.stdout)["version"])  # printed also when unhealthy (exit 1)
            except (subprocess.TimeoutExpired, json.JSONDecodeError, KeyError, TypeError, ValueError):
                return None

        # --- a device dies mid-run; the federation goes on without it ---------------------------------------
        _wait("version 2", lambda: (version() or 0) >= 2, 300, [cloud])
        # the aggregator's Prometheus endpoint agrees with metrics.jsonl (its counters move when a line is written,
        # after the store's commit: wait for the counter itself, then read the lines it counts)
        scraped = _wait("the scraped versions counter to reach 2", lambda: _scraped_versions_at_least(cloud_metrics, 2),
                        300, [cloud])
        lines = _metric_lines(run_dir)
        seen = int(scraped[("edgefed_versions_total", ())])
        assert seen >= 2 and scraped[("edgefed_updates_accepted_total", ())] == sum(r["accepted"] for r in lines[:seen])
        victim = devices[1]
        os.killpg(agents[victim].pid, signal.SIGKILL)
        agents[victim].wait()
        killed_at = store.latest_version()
        _wait("a version published while the device is down", lambda: store.latest_version() > killed_at, 300, [cloud])

        # --- the aggregator (the ServerApp process) is killed: the service resubmits it, it resumes from Redis ------
        # Killed now, while the device is down (so the run is far from its last version), and at a moment when every
        # committed version has its metrics.jsonl line: the process is frozen (SIGSTOP), the two compared, and it is
        # killed only if they agree (else let go and tried again). A version committed but not yet recorded (its
        # central evaluation runs in a thread) would be missing from metrics.jsonl and the counters for good.
        serverapps = [p for p in psutil.process_iter(["cmdline"])
                      if "flwr-serverapp" in " ".join(p.info["cmdline"] or []) and superlink in " ".join(p.info["cmdline"])]
        assert len(serverapps) == 1, serverapps
        serverapp = serverapps[0]

        def kill_when_recorded() -> tuple[int] | None:
            serverapp.suspend()
            try:
                committed = store.latest_version() or 0
                recorded = _metric_lines(run_dir)
                caught_up = len(recorded) == committed and recorded and recorded[-1]["version"] == committed \
                    and store.latest_version() == committed
            except BaseException:
                serverapp.resume()
                raise
            if not caught_up:
                serverapp.resume()
                return None
            serverapp.kill()
            _wait("the killed ServerApp to be gone", lambda: _dead(serverapp), 60)
            return (committed,)

        # The other devices are frozen meanwhile (their whole process groups): no update arrives, so the aggregator
        # only finishes what it holds and is killed mid-run however fast this machine trains; they go on after.
        running = [agents[d] for d in devices if d != victim]
        for agent in running:
            os.killpg(agent.pid, signal.SIGSTOP)
        try:
            (before,) = _wait("a moment when every committed version is recorded", kill_when_recorded, 240, [cloud])
        finally:
            for agent in running:
                os.killpg(agent.pid, signal.SIGCONT)
        assert store.latest_version() == before, "a commit landed while the ServerApp was frozen"
        assert before < VERSIONS, "the aggregator must be killed mid-run"
        # the endpoint is the service's: with no ServerApp running it still answers, with every version recorded
        assert scrape(cloud_metrics)[("edgefed_versions_total", ())] == before
        # --- the device comes back while the aggregator is down; it rejoins once its old session has expired ------
        restarted_at = time.time()
        agents[victim] = _start(["edge", "agent", "--config", str(configs[victim])], configs[victim].parent / "agent.log")
        # the SuperLink notices the dead ServerApp by its missing heartbeat (a minute or two)
        _wait("the service to resubmit the run", lambda: _json(service_dir / "service.json").get("restarts") == 1,
              300, [cloud])
        _wait("a version from the resumed aggregator", lambda: (version() or 0) > before, 600, [cloud])
        resumed = _wait("the resumed aggregator's metrics to count a new version",
                        lambda: _scraped_versions_at_least(cloud_metrics, before + 1), 300, [cloud])
        lines = _metric_lines(run_dir)
        seen = int(resumed[("edgefed_versions_total", ())])  # replayed from the run directory, then counted on
        assert seen > before and resumed[("edgefed_updates_accepted_total", ())] == sum(r["accepted"] for r in lines[:seen])

        # --- the killed device has rejoined with its node key ------------------------------------------------------
        _wait(f"{victim} to rejoin", lambda: status(victim).get("state") == "connected"
              and status(victim)["updated_at"] > restarted_at, 300, [cloud])
        assert status(victim)["node_id"] == node_ids[victim]  # same node key, same node

        # --- the run completes; every device holds the newest signed INT8 model ---------------------------
        _wait("the federation to finish", lambda: _json(service_dir / "service.json").get("state") == "finished",
              900, [cloud, *agents.values()])
        summary = _json(run_dir / "summary.json")
        deployed = summary["deployed_model"]
        assert summary["versions"] == VERSIONS and deployed["published"] and deployed["quantization"] == "int8"
        assert deployed["devices"] == deployed["devices_installed"] == DEVICES, deployed
        report = json.loads(_edgefed("cloud", "status", "--config", str(cloud_toml), "--json").stdout)
        assert report["version"] == VERSIONS and report["updates_accepted"] >= 2 * VERSIONS
        assert report["last_export"]["published"] and report["last_export"]["version"] == deployed["version"]
        assert report["nodes"] == {"registered": DEVICES, "online": DEVICES}, report["nodes"]
        rejoined = report["devices_seen"][victim]
        assert float(rejoined["last_update_at"]) > restarted_at, "the restarted device contributed no update"
        assert rejoined["device-cores"] == 1.0 and rejoined["device-memory-mb"] > 0  # capabilities reached the cloud

        trusted = load_cloud_public(cloud_public)
        for device in devices:
            current = configs[device].parent / "state" / "models" / "current"
            manifest = verify_manifest((current / MANIFEST_FILE).read_bytes(), trusted)
            assert manifest.version == deployed["version"] and manifest.quantization == "int8", device
            manifest.check_files(current)
            _wait(f"{device}'s agent to report the model", lambda d=device: status(d).get("model_version")
                  == deployed["version"], 300)

        device = scrape(device_metrics)  # the agent's own endpoint
        assert device[("edgefed_edge_model_version", ())] == deployed["version"]
        assert device[("edgefed_edge_inbox_backlog", ())] == 0 and device[("edgefed_edge_connected", ())] == 1.0
        assert 0 < device[("edgefed_edge_inference_latency_seconds", ())] < 5

        # --- the device runs the model on its own media --------------------------------------------------
        clips = sorted((configs[devices[0]].parent / "inbox").rglob("*.mp4"))[:2]
        out = _edgefed("infer", *map(str, clips), "--json", "--model-dir",
                       str(configs[devices[0]].parent / "state" / "models"), "--cloud-key", str(cloud_public))
        predictions = json.loads(out.stdout)["predictions"]
        assert {p["path"] for p in predictions} == {str(c) for c in clips}
        assert all(p["label"] in cfg.label_names for p in predictions)
    finally:
        for proc in agents.values():
            _stop(proc)
        _stop(cloud)
        if store is not None:
            store.close()
    assert cloud.returncode == 0, (tmp_path / "cloud.log").read_text()[-3000:]
