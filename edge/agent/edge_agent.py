"""`edgefed edge agent`: one device in a real fleet.

    flower-supernode ──HTTPS, node key──► the cloud's SuperLink
        └ flwr-clientapp per instruction: edge/client_app.py (train, evaluate),
          forked from the warm process that has its libraries loaded (edge/agent/warm_clientapp.py)
    inbox watcher thread: new media -> feature cache + manifests (edge/agent/inbox.py)
    model watcher thread: WatchModels -> verify, install, hot-swap (edge/models/updater.py)

Everything the device must keep lives in its state folder (feature cache,
manifests, error-feedback residual, installed models) or its key folder, so a
restarted agent resumes: the SuperNode reconnects with the same node key (and
so the same node id), the ClientApp finds its residual, the runtime its model.
The SuperNode is restarted if it exits. The SuperLink refuses a node key
that is not enrolled (`refused` in `agent.json`, retried with back-off, so
enrolling the device later is enough), and also, for up to a minute (two
heartbeats), a node whose previous session ended in a crash: an agent that
has connected before reports `rejoining` and retries every few seconds.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from edgefed.common.atomic import write_json_atomically
from edgefed.common.keys import (
    AGGREGATOR_KEY,
    CLOUD_SIGNING_KEY,
    DEVICE_KEY,
    KeyMaterialError,
    load_cloud_public,
    load_device_key,
    node_auth_paths,
)
from edgefed.common.onnx_inference import feeds, single_clip_latency_ms
from edgefed.common.processes import die_with_parent, stop_process
from edgefed.common.wire.request_auth import DeviceSigner
from edgefed.edge.agent.config import AgentConfig
from edgefed.edge.agent.inbox import InboxWatcher
from edgefed.edge.agent.metrics import AgentMetrics
from edgefed.edge.agent.warm_clientapp import WarmStarter
from edgefed.edge.dataset import cached_features
from edgefed.edge.models.runtime import ModelRuntime
from edgefed.edge.models.updater import ModelUpdater

log = logging.getLogger(__name__)

STATUS_FILE = "agent.json"
REFUSED_MARK = "Failed to activate SuperNode"
SUPERVISE_S = 2.0
MAX_BACKOFF_S = 60.0
REJOIN_RETRY_S = 5.0
REJOIN_WINDOW_S = 180.0  # Flower expires a crashed node's session after two heartbeats (60 s by default)
INITIAL_BACKOFF_S = 2.0


class AgentError(RuntimeError):
    """The agent cannot start: missing keys, certificates or config."""


def check_device(cfg: AgentConfig) -> None:
    if not (cfg.key_dir / f"{DEVICE_KEY}.key").exists():
        raise AgentError(f"{cfg.key_dir}: no device key (run `edgefed keys init --role edge --dir {cfg.key_dir}`)")
    for name in (AGGREGATOR_KEY, CLOUD_SIGNING_KEY):
        if not (cfg.cloud_keys / f"{name}.pub").exists():
            raise AgentError(f"{cfg.cloud_keys}: no {name}.pub (copy the cloud's public keys to the device)")
    if cfg.ca_cert is not None and not cfg.ca_cert.exists():
        raise AgentError(f"{cfg.ca_cert}: the fleet CA certificate is missing")


def _previous_node_id(status_file: Path) -> int | None:
    try:
        node_id = json.loads(status_file.read_text()).get("node_id")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return int(node_id) if node_id else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EdgeAgent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.stop_event = threading.Event()
        self.supernode: subprocess.Popen | None = None
        self.state = "starting"
        self.node_id: int | None = None
        # The node id this device had before a restart (a refusal then most likely means "session still open").
        self.known_node_id = _previous_node_id(cfg.state_dir / STATUS_FILE)
        self.starts = 0
        self.latency_ms: float | None = None
        self._backoff = INITIAL_BACKOFF_S
        self._restart_at = 0.0
        self._refused_since: float | None = None
        self._latency_version = 0
        self.metrics: AgentMetrics | None = None
        self._threads: list[threading.Thread] = []
        self.warm = WarmStarter(cfg.state_dir, self._supernode_base_env()) if cfg.warm_clientapp else None

    def start(self) -> EdgeAgent:
        try:
            check_device(self.cfg)
            self.auth_key, _ = node_auth_paths(self.cfg.key_dir)
            trusted = load_cloud_public(self.cfg.cloud_keys)
            signer = DeviceSigner(self.cfg.device_id, load_device_key(self.cfg.key_dir))
        except KeyMaterialError as err:
            raise AgentError(str(err)) from None
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self._kill_leftover_supernode()
        self.inbox = InboxWatcher(self.cfg)
        self.runtime = ModelRuntime(self.cfg.state_dir / "models", trusted, threads=1,
                                    feature_config=self.cfg.feature_config().feature_config())
        self.updater = ModelUpdater(self.runtime, self.cfg.model_service, signer, self.cfg.ca_cert)
        for name, target in (("inbox", self.inbox.run), ("model-watch", self.updater.watch)):
            thread = threading.Thread(target=target, args=(self.stop_event,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.warm is not None:
            self.warm.ensure_running()
        self._start_supernode()
        self.metrics = (AgentMetrics(self.status).serve(self.cfg.metrics_port, self.cfg.metrics_bind)
                        if self.cfg.metrics_port else None)
        return self

    # --- the SuperNode ---------------------------------------------------------------------
    def supernode_command(self, runtime_port: int) -> list[str]:
        node_config = " ".join(f"{k}={json.dumps(v)}" for k, v in self.cfg.node_config().items())
        cmd = ["flower-supernode", "--superlink", self.cfg.superlink, "--node-config", node_config,
               "--port", str(runtime_port), "--max-retries", "10", "--max-wait-time", "120"]
        if self.cfg.ca_cert is None:
            return [*cmd, "--insecure"]
        return [*cmd, "--root-certificates", str(self.cfg.ca_cert), "--auth-supernode-private-key", str(self.auth_key)]

    def _start_supernode(self) -> None:
        port = self.cfg.runtime_port or _free_port()
        log_path = self.cfg.state_dir / "supernode.log"
        self._log_offset = log_path.stat().st_size if log_path.exists() else 0
        out = open(log_path, "ab")  # noqa: SIM115 - the child keeps it
        env = self._supernode_base_env() if self.warm is None else self.warm.supernode_env()
        self.supernode = subprocess.Popen(self.supernode_command(port), stdout=out, stderr=subprocess.STDOUT,
                                          env=env, preexec_fn=die_with_parent)
        out.close()
        (self.cfg.state_dir / "supernode.pid").write_text(f"{self.supernode.pid}\n")
        self.starts += 1
        self.node_id = None  # read again from this SuperNode's log (a re-enrolled device gets a new one)
        self.state = "connecting"
        log.info("%s: SuperNode started (pid %d) for %s", self.cfg.device_id, self.supernode.pid, self.cfg.superlink)

    def _supernode_base_env(self) -> dict[str, str]:
        return {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_HOME": str(self.cfg.state_dir / "flwr-home"),
                "OMP_NUM_THREADS": str(self.cfg.offered_cores)}

    def _kill_leftover_supernode(self) -> None:
        """A previous agent killed hard may have left its SuperNode running: two with one key must not run."""
        pid_file = self.cfg.state_dir / "supernode.pid"
        try:
            pid = int(pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if b"flower-supernode" in cmdline:
            log.warning("stopping the SuperNode (pid %d) a previous agent left behind", pid)
            os.kill(pid, signal.SIGTERM)
            for _ in range(50):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.1)

    def _supernode_log_tail(self) -> str:
        path = self.cfg.state_dir / "supernode.log"
        with open(path, "rb") as fh:
            fh.seek(self._log_offset)
            return fh.read().decode(errors="replace")

    # --- running ---------------------------------------------------------------------------
    def supervise(self) -> None:
        """Until stop(): keep the SuperNode running (back-off after failures) and agent.json current."""
        while not self.stop_event.wait(SUPERVISE_S):
            try:
                self._check()
                self.write_status()
            except Exception:  # noqa: BLE001 - a device agent logs and goes on
                log.exception("%s: agent step failed; retrying", self.cfg.device_id)

    def _check(self) -> None:
        if self.warm is not None:
            self.warm.ensure_running()  # meanwhile a ClientApp starts cold
        proc = self.supernode
        if proc is not None and proc.poll() is None:
            if self.node_id is None:
                self._read_node_id()
                if self.node_id is not None:
                    self._backoff, self._refused_since = INITIAL_BACKOFF_S, None
        elif proc is not None:
            refused = REFUSED_MARK in self._supernode_log_tail()
            now = time.monotonic()
            if refused and self._refused_since is None:
                self._refused_since = now
            # A device that was connected before is most likely refused because its old session is still
            # open; after REJOIN_WINDOW_S of that it is treated like any refused key (revoked, rotated).
            rejoining = self.known_node_id is not None and now - (self._refused_since or now) < REJOIN_WINDOW_S
            if refused and rejoining:
                self.state = "rejoining"
                log.warning("%s: the SuperLink still holds node %d's previous session (it expires within two "
                            "heartbeats after a crash); retrying", self.cfg.device_id, self.known_node_id)
                delay = REJOIN_RETRY_S
            elif refused:
                self.state = "refused"
                log.error("%s: the SuperLink refused this device's node key (not enrolled, or revoked? "
                          "`edgefed cloud enrol`)", self.cfg.device_id)
                delay, self._backoff = self._backoff, min(self._backoff * 2, MAX_BACKOFF_S)
            else:
                self._refused_since = None
                self.state = "reconnecting"
                log.warning("%s: SuperNode exited with code %s", self.cfg.device_id, proc.returncode)
                delay, self._backoff = self._backoff, min(self._backoff * 2, MAX_BACKOFF_S)
            self.supernode, self._restart_at = None, now + delay
        elif time.monotonic() >= self._restart_at:
            self._start_supernode()

    def _read_node_id(self) -> None:
        for line in self._supernode_log_tail().splitlines():
            if "SuperNode ID:" in line:
                self.node_id = self.known_node_id = int(line.rsplit(":", 1)[1].strip())
                self.state = "connected"
                log.info("%s: connected as node %d", self.cfg.device_id, self.node_id)

    def stop(self) -> None:
        self.stop_event.set()
        stop_process(self.supernode, 20.0)
        if self.warm is not None:
            self.warm.stop()
        self.updater.close()
        if self.metrics is not None:
            self.metrics.close()
        self.state = "stopped"
        self.write_status()

    def _measure_latency(self) -> None:
        """Time one held-out clip through a newly installed model: the latency this device sees."""
        active = self.runtime.active
        if active is None or active.version == self._latency_version or not self.inbox.heldout:
            return
        entry = next(iter(self.inbox.heldout.values()))
        # From the cache the inbox filled: the agent itself never decodes an untrusted file.
        features = cached_features(entry, self.inbox.extractor, self.cfg.cache_dir)
        if features is not None:
            self.latency_ms = single_clip_latency_ms(active.session, feeds(features))
            self._latency_version = active.version

    def status(self) -> dict:
        """What agent.json and the metrics endpoint report."""
        inbox = self.inbox.state
        return {
            "device_id": self.cfg.device_id, "state": self.state, "node_id": self.node_id,
            "supernode_pid": self.supernode.pid if self.supernode else None, "supernode_starts": self.starts,
            "model_version": self.runtime.version, "inbox_backlog": inbox.backlog, "clips_extracted": inbox.extracted,
            "clips_failed": inbox.failed, "unlabelled_files": inbox.unlabelled,
            "train_clips": len(self.inbox.train), "heldout_clips": len(self.inbox.heldout),
            "inference_latency_ms": self.latency_ms, "updated_at": time.time(),
        }

    def write_status(self) -> None:
        self.runtime.refresh()  # a ClientApp may have installed an announced model
        self._measure_latency()
        status = self.status()
        write_json_atomically(self.cfg.state_dir / STATUS_FILE, status)
