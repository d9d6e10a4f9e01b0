"""`edgefed simulate`: prepare data, then run the Flower apps on the simulation engine.

The ServerApp and ClientApp are the ones `flwr run .` loads; this runner only
starts Flower's simulation runtime in-process (Ray actors for the clients, the
ServerApp in a thread) with our resolved run config, and watches
metrics.jsonl for live progress.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from edgefed.cloud.training.participant import start_trainer_process
from edgefed.common.config import EdgefedConfig
from edgefed.common.run_dir import RunDir
from edgefed.simulations.device_profiles import device_class

log = logging.getLogger(__name__)

# ClientApp processes (Ray actors) a local simulation runs at most: each holds torch, the model and the features
# of the devices it serves. An idle simulated device costs its files on disk, not a process.
MAX_ACTORS = 8


def run_federation(
    cfg: EdgefedConfig,
    num_clients: int,
    on_round: Callable[[dict], None] | None = None,
    client_cpus: float | None = None,
    verbose: bool = False,
    ray_address: str | None = None,
    client_gpus: float = 0.0,
) -> RunDir:
    """Run the federation on `num_clients` simulated nodes; returns the run directory.

    By default a small fleet gets a Ray actor per node (`client_cpus` = cores / nodes),
    so all its nodes train at once as real devices would: a slow simulated device
    sleeps in its actor without holding back the others. A fleet larger than
    MAX_ACTORS shares MAX_ACTORS actors (or `concurrency` of them, if fewer), and in
    async mode without a `concurrency` that many devices train at a time.

    `ray_address` (host:port of a running cluster's head, or "auto") runs the
    clients on that Ray cluster instead of a local one; each ClientApp actor
    takes `client_cpus` (default 1) and `client_gpus`, and Flower starts as many
    as the cluster's resources hold, spread over its nodes. Every node needs
    edgefed installed and the run's data and out folders at the same paths."""
    device_class(cfg.device_profile, 0, 1)  # an unknown profile fails here, not inside an actor
    actors = min(num_clients, cfg.concurrency or num_clients, MAX_ACTORS)
    if num_clients > actors and cfg.mode == "async" and not cfg.concurrency:
        log.info("%d simulated devices share %d ClientApp processes: %d train at a time (set concurrency to change)",
                 num_clients, actors, actors)
        cfg = cfg.replace(concurrency=actors)
    if client_cpus is None:
        client_cpus = 1.0 if ray_address else (os.cpu_count() or 1) / max(actors, 1)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Imported late: flwr and ray are heavy, and the CLI's other commands don't need them.
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.logger import update_console_handler
    from flwr.supercore.telemetry import EventType

    from edgefed.cloud.server_app import app as server_app
    from edgefed.simulations import engine_delivery
    from edgefed.simulations.client_app import app as client_app

    engine_delivery.install()  # Flower's engine asks every node for messages; at a thousand that was the bottleneck
    if not cfg.run_id:
        raise ValueError("run_federation needs cfg.run_id set so it can watch the run directory")
    run = RunDir(Path(cfg.out_dir) / cfg.run_id)
    if not verbose:
        update_console_handler(level=logging.WARNING, timestamps=False, colored=True)
    backend_config = {
        "client_resources": {"num_cpus": client_cpus, "num_gpus": client_gpus},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
    }
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_run_config())
    logging_args = {"logging_level": logging.INFO if verbose else logging.WARNING, "log_to_driver": True}
    if ray_address:
        backend_config["init_args"] = {"address": ray_address}
        _check_reachable(ray_address)  # Ray itself retries an absent head for minutes
        try:
            _start_ray({"address": ray_address, **logging_args})
        except ConnectionError as err:
            raise RuntimeError(f"cannot reach the Ray cluster at {ray_address}: {err}") from None
    else:
        _start_ray({**backend_config["init_args"], **logging_args})
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(run, on_round, stop), daemon=True)
    watcher.start()
    trainer = start_trainer_process(cfg, run) if cfg.cloud_trainer_features else None
    try:
        # Flower 1.42's public `run_simulation` cannot pass a run config to the
        # ServerApp; this is the call it makes, with our context added.
        _run_simulation(
            num_supernodes=num_clients,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app,
            server_app=server_app,
            backend_name="ray",
            backend_config=backend_config,
            server_app_context=context,
            verbose_logging=verbose,
        )
    finally:
        stop.set()
        watcher.join(timeout=5)
        if trainer is not None and trainer.poll() is None:
            trainer.terminate()
            trainer.wait(timeout=30)
    if not (run.path / "summary.json").exists():
        raise RuntimeError(f"the simulation ended without a summary; see the log above and {run.path}")
    return run


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """A TCP connection to a Ray head's host:port ("auto" and ray:// addresses are left to Ray)."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return
    except ValueError:
        raise RuntimeError(f"--ray-address {address!r} is not host:port") from None
    except OSError as err:
        raise RuntimeError(f"cannot reach the Ray cluster at {address}: {err.strerror or err}") from None


def _start_ray(init_args: dict, attempts: int = 3) -> None:
    """Start Ray before Flower does, retrying a start-up that timed out.

    Ray gives its raylet a fixed 30 s to register; on a loaded 2-core machine it
    sometimes misses that, and Flower's simulation then crashes while its
    ServerApp thread waits for nodes. Flower uses a Ray that is already
    initialised (and shuts it down at the end), so starting it here with the same
    arguments, and once more if it times out, changes nothing else."""
    import ray

    if ray.is_initialized():
        return
    # As Flower's Ray backend does: actors must import this process's modules.
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    for attempt in range(1, attempts + 1):
        try:
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)
            return
        except Exception as err:  # Ray raises a bare Exception for this  # noqa: BLE001
            if "timed out during startup" not in str(err) or attempt == attempts:
                raise
            log.warning("Ray did not start in time (attempt %d of %d); retrying", attempt, attempts)
            ray.shutdown()
            time.sleep(2.0)


def _watch(run: RunDir, on_round: Callable[[dict], None] | None, stop: threading.Event) -> None:
    seen = 0
    while True:
        done = stop.is_set()
        records = run.read_metrics() if run.metrics_path.exists() else []
        for record in records[seen:]:
            if on_round:
                on_round(record)
        seen = len(records)
        if done:
            return
        time.sleep(0.5)
