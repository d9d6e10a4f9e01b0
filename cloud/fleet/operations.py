"""The fleet as the cloud sees it: enrolling and revoking devices, and `edgefed cloud status`.

A device is enrolled with two public keys from its key folder, and both are
needed for it to take part:

- `node_auth.pub` is registered with the SuperLink (Flower SuperNode
  authentication): without it the device's SuperNode cannot connect at all;
- `device_ed25519.pub` goes into the cloud's registry.json: the aggregator
  opens only updates signed by a registered device key.

Revoking removes both. `nodes.json` beside the registry maps device ids to
their Flower node ids.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from edgefed.cloud.fleet.service import SERVICE_FILE, control_for, service_run_dir
from edgefed.cloud.fleet.superlink import SuperLinkError
from edgefed.cloud.publishing.registry import ModelRegistry
from edgefed.cloud.state.store import StateStoreError, store_for
from edgefed.common.atomic import write_json_atomically
from edgefed.common.config import EdgefedConfig
from edgefed.common.keys import DEVICE_KEY, NODE_AUTH_KEY, REGISTRY, DeviceRegistry, load_ed25519_public

NODES_FILE = "nodes.json"
STALE_S = 30.0


def _cloud_keys(cfg: EdgefedConfig) -> Path:
    return Path(cfg.keys_root) / "cloud"


def _nodes(cfg: EdgefedConfig) -> dict[str, int]:
    path = _cloud_keys(cfg) / NODES_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def enrol(cfg: EdgefedConfig, device_id: str, device_keys: Path) -> int:
    """Register a device's node key with the SuperLink and its signing key with the aggregator; returns its node id."""
    signing = load_ed25519_public(device_keys / f"{DEVICE_KEY}.pub")
    node_key = device_keys / f"{NODE_AUTH_KEY}.pub"
    if not node_key.exists():
        raise SuperLinkError(f"{node_key} missing: make the device's keys with `edgefed keys init --role edge`")
    nodes = _nodes(cfg)
    if device_id in nodes:  # re-enrolment (a rotated key): the old node key goes
        control_for(cfg).unregister_node(nodes[device_id])
    node_id = control_for(cfg).register_node(node_key, device_id)
    DeviceRegistry(_cloud_keys(cfg) / REGISTRY).register(device_id, signing)
    nodes[device_id] = node_id
    write_json_atomically(_cloud_keys(cfg) / NODES_FILE, nodes)
    return node_id


def revoke(cfg: EdgefedConfig, device_id: str) -> bool:
    """Refuse a device from now on: its node key at the SuperLink, its updates at the aggregator."""
    nodes = _nodes(cfg)
    removed = DeviceRegistry(_cloud_keys(cfg) / REGISTRY).revoke(device_id)
    if device_id in nodes:
        control_for(cfg).unregister_node(nodes.pop(device_id))
        write_json_atomically(_cloud_keys(cfg) / NODES_FILE, nodes)
        removed = True
    return removed


def status(cfg: EdgefedConfig) -> dict[str, object]:
    """What `edgefed cloud status` prints: the service, the federation's progress, the devices, the last export."""
    run = service_run_dir(cfg)
    service_file = run.path / "service" / SERVICE_FILE
    service = json.loads(service_file.read_text()) if service_file.exists() else None
    if service is not None and service["state"] not in ("stopped", "failed"):
        # the service rewrites the file every few seconds; an old one means it is not running
        service["responding"] = time.time() - float(service["updated_at"]) < STALE_S
    report: dict[str, object] = {"service": service}
    try:
        store = store_for(cfg)
        try:
            report.update(version=store.latest_version() or 0, buffer_depth=store.buffer_depth(),
                          updates_rejected=store.rejected_counts(), devices_seen=store.devices())
        finally:
            store.close()
    except (StateStoreError, OSError) as err:
        report["state_store_error"] = str(err)
    records = run.read_metrics() if run.metrics_path.exists() else []
    report["updates_accepted"] = sum(int(r.get("accepted", r.get("clients", 0))) for r in records)
    report["last_accuracy"] = next((r["accuracy"] for r in reversed(records) if r.get("accuracy") is not None), None)
    exports = run.read_metrics("exports.jsonl") if (run.path / "exports.jsonl").exists() else []
    report["last_export"] = exports[-1] if exports else None
    # what devices are offered now (a rollback publishes without an export)
    report["published_version"] = ModelRegistry(run.path / "models").latest_version() if (run.path / "models").exists() else 0
    try:
        nodes = control_for(cfg).nodes()
        report["nodes"] = {"registered": len(nodes), "online": sum(n.get("status") == "online" for n in nodes)}
    except SuperLinkError as err:
        report["nodes"] = {"error": str(err)}
    return report


def service_problems(report: dict[str, object]) -> list[str]:
    """What makes the service unhealthy (empty: healthy), for `cloud status`'s exit code."""
    problems = []
    service = report.get("service")
    if not isinstance(service, dict):
        problems.append("the service has not run here (no service.json)")
    elif service["state"] in ("failed", "stopped") or not service.get("responding", True):
        problems.append(f"the service is {service['state'] if service['state'] != 'running' else 'not responding'}")
    if "state_store_error" in report:
        problems.append(f"state store: {report['state_store_error']}")
    nodes = report.get("nodes")
    if isinstance(nodes, dict) and "error" in nodes:
        problems.append(f"SuperLink: {nodes['error']}")
    return problems
