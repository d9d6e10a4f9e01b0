"""`edgefed cloud serve`: the cloud side of a real fleet, as one long-lived service.

    redis (state store) <- ServerApp (flwr-serverapp, started by the SuperLink for our run)
    flower-superlink   <- edge agents' SuperNodes (HTTPS, node auth), the `flwr` CLI
    model service      <- devices watch and download signed ONNX models (gRPC, TLS)
    Prometheus /metrics <- the run directory's records and the store's live gauges (`metrics-port`)
    cloud trainer      -> sealed updates into the same Redis buffer (optional)

The service starts the SuperLink (or uses a running one), serves the model
registry `<run>/models` itself (so devices can watch it between and across
runs) and the federation's Prometheus endpoint (so that it is there between,
during and after runs, through a resubmission), submits the federation as a
Flower run with the resolved config, and supervises it: a ServerApp that dies is submitted again and resumes from
Redis where it stopped (nothing acknowledged is lost: the buffer is durable).
`service.json` in `<run>/service/` is what `edgefed cloud status` reads.
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgefed.cloud.fleet.superlink import FlowerControl, SuperLinkError, SuperLinkProcess
from edgefed.cloud.metrics.prometheus import FederationMetrics
from edgefed.cloud.publishing.model_service import ModelServer, enrolled_devices
from edgefed.cloud.publishing.registry import ModelRegistry
from edgefed.cloud.state.store import StateStoreError, store_for
from edgefed.cloud.training.participant import start_trainer_process
from edgefed.common.atomic import write_bytes_atomically, write_json_atomically
from edgefed.common.config import EdgefedConfig, read_toml, redact_url
from edgefed.common.keys import AGGREGATOR_KEY, CLOUD_SIGNING_KEY, KeyMaterialError, load_cloud_signing_key
from edgefed.common.processes import stop_process
from edgefed.common.run_dir import RunDir

log = logging.getLogger(__name__)

SERVICE_FILE = "service.json"
SUPERVISE_S = 5.0
# Asking the SuperLink for the run's status runs the `flwr` CLI (a second or more of CPU): while new versions
# keep coming the run is evidently alive, so it is asked only after QUIET_S without one, or every STATUS_EVERY_S.
QUIET_S = 15.0
STATUS_EVERY_S = 60.0


class ServiceError(RuntimeError):
    """The cloud service cannot start: a missing key, certificate, Redis or app folder."""


# A service's state must outlive it, and operators scrape it.
SERVICE_DEFAULTS = {"state-store": "redis://127.0.0.1:6379/0", "metrics-port": "9400"}


def load_service_config(path: Path, overrides: list[str]) -> EdgefedConfig:
    """The service's config file (flat run-config keys) with `--set` overrides; Redis unless it says otherwise."""
    cfg = EdgefedConfig.from_file(path)
    written = read_toml(path, "config file")
    defaults = [f"{k}={v}" for k, v in SERVICE_DEFAULTS.items() if k not in written]
    return cfg.with_overrides([*defaults, *overrides])


def service_run_dir(cfg: EdgefedConfig) -> RunDir:
    """The service's run directory: `<out-dir>/<run-id>`, the run id defaulting to the federation name."""
    return RunDir(Path(cfg.out_dir) / (cfg.run_id or cfg.federation))


def control_for(cfg: EdgefedConfig) -> FlowerControl:
    """The Control API of the fleet's SuperLink (enrol, revoke, list nodes, runs)."""
    ca = Path(cfg.tls_dir) / "ca.crt" if cfg.tls_dir else None
    return FlowerControl(cfg.superlink, service_run_dir(cfg).path / "service" / "flwr-cli", ca)


def default_app_dir() -> Path:
    """The edgefed source tree (its pyproject.toml names the Flower apps); `--app-dir` elsewhere."""
    for folder in Path(__file__).resolve().parents:
        if (folder / "pyproject.toml").is_file():
            return folder
    return Path.cwd()


def federation_version(cfg: EdgefedConfig) -> int:
    """The newest global version in the state store (0 before the first); raises if it is unreachable."""
    store = store_for(cfg)
    try:
        return store.latest_version() or 0
    finally:
        store.close()


def rollback_fleet(cfg: EdgefedConfig, to_version: int) -> int:
    """Publish `to_version`'s model again above both the newest published and the newest global version."""
    registry = ModelRegistry(service_run_dir(cfg).path / "models")
    newest_global = federation_version(cfg)
    signing_key = load_cloud_signing_key(Path(cfg.keys_root) / "cloud")
    return registry.republish(to_version, signing_key, max(registry.latest_version(), newest_global) + 1)


def check_prerequisites(cfg: EdgefedConfig, app_dir: Path) -> None:
    """Fail with one clear message before anything is started."""
    cloud_keys = Path(cfg.keys_root) / "cloud"
    for name in (AGGREGATOR_KEY, CLOUD_SIGNING_KEY):
        if not (cloud_keys / f"{name}.key").exists():
            raise ServiceError(f"{cloud_keys}: no {name}.key (run `edgefed keys init --role cloud --dir {cloud_keys}`)")
    pyproject = app_dir / "pyproject.toml"
    if not pyproject.exists() or "[tool.flwr.app]" not in pyproject.read_text():
        raise ServiceError(f"{app_dir}: not the edgefed app folder (no pyproject.toml with [tool.flwr.app]); pass --app-dir")
    if cfg.state_store.startswith("memory://"):
        raise ServiceError("state-store is memory://: the service needs Redis (state-store = \"redis://host:6379/0\")")
    if cfg.transport != "sealed":
        raise ServiceError("transport is plain: a fleet takes only sealed, signed updates (transport = \"sealed\")")
    if redact_url(cfg.state_store) != cfg.state_store:
        # the run config is written to disk, shown by Flower's `list-runs` and sent to every device
        raise ServiceError("state-store carries a password: put it in a file and set state-store-password-file")
    try:
        federation_version(cfg)
    except (StateStoreError, OSError) as err:
        raise ServiceError(f"state store {redact_url(cfg.state_store)} unreachable: {err}") from None
    if cfg.tls_dir and not (Path(cfg.tls_dir) / "server.crt").exists():
        raise ServiceError(f"{cfg.tls_dir}: no server.crt (make the fleet's certificates with `edgefed certs`)")


@dataclass
class CloudService:
    cfg: EdgefedConfig
    app_dir: Path = field(default_factory=default_app_dir)
    external_superlink: bool = False
    max_restarts: int = 5

    def __post_init__(self) -> None:
        self.run = service_run_dir(self.cfg)
        self.dir = self.run.path / "service"
        tls = Path(self.cfg.tls_dir) if self.cfg.tls_dir else None
        self.superlink = SuperLinkProcess(self.cfg.superlink, self.dir, tls, self.cfg.node_auth)
        self.control = control_for(self.cfg)
        self.model_server: ModelServer | None = None
        self.metrics: FederationMetrics | None = None
        self.trainer: subprocess.Popen | None = None
        self.logs: subprocess.Popen | None = None
        self.flower_run: int | None = None
        self.state = "starting"
        self.restarts = 0
        self.failures_in_a_row = 0
        self.version_at_submit = 0
        self._retry_at = 0.0
        self._seen_version = -1
        self._progress_at = self._status_at = 0.0
        self.stop_event = threading.Event()

    # --- lifecycle ----------------------------------------------------------------------
    def start(self) -> CloudService:
        try:
            check_prerequisites(self.cfg, self.app_dir)
        except KeyMaterialError as err:
            raise ServiceError(str(err)) from None
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.external_superlink:
            self.superlink.start()
        registry = ModelRegistry(self.run.path / "models")
        self.model_server = ModelServer(registry, self.cfg.model_service, self.cfg.tls_dir or None,
                                        devices=enrolled_devices(self.cfg)).start()
        log.info("model service at %s serving %s", self.model_server.address, registry.root)
        if self.cfg.metrics_port:
            self.metrics = FederationMetrics(self.cfg.federation).follow(self.run, store_for(self.cfg))
            self.metrics.serve(self.cfg.metrics_port, self.cfg.metrics_bind)
            log.info("Prometheus metrics on %s:%d", self.cfg.metrics_bind, self.cfg.metrics_port)
        if self.cfg.cloud_trainer_features:
            self.trainer = start_trainer_process(self.cfg, self.run)
        self._submit()
        return self

    def run_config(self) -> EdgefedConfig:
        """What the ServerApp runs with: this service serves the models and the metrics, and tells devices where."""
        assert self.model_server is not None
        return self.cfg.replace(run_id=self.run.path.name, serve_models=False, metrics_port=0,
                                model_service_public=self.cfg.model_service_public or self.model_server.address)

    def _submit(self) -> None:
        path = self.dir / "run_config.toml"
        lines = [f"{k} = {json.dumps(v)}" for k, v in self.run_config().to_run_config().items()]
        write_bytes_atomically(path, ("\n".join(lines) + "\n").encode())  # mode 0600 (mkstemp): it names key files
        self.version_at_submit = self._store_version()
        self.flower_run = self.control.submit_run(self.app_dir, path)
        if self.logs is not None and self.logs.poll() is None:
            self.logs.terminate()
        self.logs = self.control.log_stream(self.flower_run, self.dir / "serverapp.log")
        self.state = "running"
        log.info("federation %s submitted as Flower run %d", self.cfg.federation, self.flower_run)
        self.write_status()

    def supervise(self) -> None:
        """Until stop(): follow the run; a failed ServerApp is submitted again and resumes from Redis.

        Nothing that goes wrong in one round of checks (a SuperLink call that
        times out, a full disk) ends the service: it is logged and tried again."""
        while not self.stop_event.wait(SUPERVISE_S):
            try:
                self._check()
            except Exception:  # noqa: BLE001 - a long-running service logs and goes on
                log.exception("supervision step failed; retrying in %.0f s", SUPERVISE_S)

    def _check(self) -> None:
        if not self.external_superlink and not self.superlink.alive:
            log.error("the SuperLink exited (code %s): restarting it; the run is submitted again",
                      self.superlink.proc.returncode if self.superlink.proc else "?")
            self.superlink.start()
            if self.state == "running":
                self._resubmit("the SuperLink restarted")
        elif self.state == "running" and self.flower_run is not None:
            self._follow_run()
        elif self.state == "resubmitting" and time.monotonic() >= self._retry_at:
            self._resubmit("retry")
        self.write_status()

    def _follow_run(self) -> None:
        now = time.monotonic()
        version = self._store_version()
        if version != self._seen_version:
            self._seen_version, self._progress_at = version, now
        if now - self._progress_at < QUIET_S and now - self._status_at < STATUS_EVERY_S:
            return
        self._status_at = now
        try:
            status = self.control.run_status(self.flower_run)
        except SuperLinkError as err:
            log.warning("run status unavailable: %s", err)
            return
        if status == "finished:completed":
            self.state = "finished"
            log.info("federation finished; the model service keeps serving")
        elif status.startswith("finished"):
            self._resubmit(f"the ServerApp ended {status}")

    def _resubmit(self, why: str) -> None:
        """Submit the run again (it resumes from the state store), backing off after failures.

        Only failures without progress count towards giving up: a ServerApp that
        published versions before it died is simply resumed."""
        progressed = self._store_version() > self.version_at_submit
        self.failures_in_a_row = 0 if progressed else self.failures_in_a_row + 1
        if self.failures_in_a_row >= self.max_restarts:
            self.state = "failed"
            log.error("%s; %d failures in a row without progress: giving up (see %s)", why, self.failures_in_a_row,
                      self.dir / "serverapp.log")
            return
        self.restarts += 1
        log.warning("%s: resubmitting (restart %d); it resumes from the state store", why, self.restarts)
        try:
            self._submit()
        except SuperLinkError as err:
            self.state = "resubmitting"
            self._retry_at = time.monotonic() + SUPERVISE_S * 2 ** self.failures_in_a_row
            log.error("resubmission failed (%s); retrying", err)

    def _store_version(self) -> int:
        try:
            return federation_version(self.cfg)
        except (StateStoreError, OSError) as err:
            log.warning("state store unreachable: %s", err)
            return self.version_at_submit

    def stop(self) -> None:
        self.stop_event.set()
        if self.flower_run is not None and self.state == "running":
            try:
                self.control.stop_run(self.flower_run)
            except SuperLinkError as err:
                log.warning("could not stop run %d: %s", self.flower_run, err)
        for proc in (self.trainer, self.logs):
            stop_process(proc, 30.0)
        self.superlink.stop()
        if self.model_server is not None:
            self.model_server.stop()
        if self.metrics is not None:
            self.metrics.close()
        self.state = "stopped"
        self.write_status()

    def write_status(self) -> None:
        status = {
            "state": self.state, "federation": self.cfg.federation, "flower_run": self.flower_run,
            "restarts": self.restarts, "superlink": self.cfg.superlink, "state_store": redact_url(self.cfg.state_store),
            "model_service": self.model_server.address if self.model_server else None,
            "run_dir": str(self.run.path.resolve()), "updated_at": time.time(),
        }
        write_json_atomically(self.dir / SERVICE_FILE, status)
