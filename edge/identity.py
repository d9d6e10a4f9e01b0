"""Who this node is: device id, key material and the folder for state that outlives a round.

A deployed device names them in its node config (`device-id`, `key-dir`,
`state-dir`, `cloud-public-key`, `ca-cert`, and the `device-cores` /
`device-memory-mb` it offers); a simulated node `partition-id = i` is `client-i`, with keys
under `<keys>/devices/client-i/` and state under `<data-dir>/devices/client-i/`
(its installed model in `models/` below that).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Context

from edgefed.common.config import EdgefedConfig
from edgefed.common.keys import load_aggregator_public, load_cloud_public, load_device_key
from edgefed.common.lru import Lru
from edgefed.common.wire.capabilities import capabilities_of
from edgefed.common.wire.request_auth import DeviceSigner
from edgefed.edge.error_feedback import ErrorFeedback
from edgefed.edge.held_adapter import HeldAdapter
from edgefed.edge.models.base_fetcher import BaseFetcher
from edgefed.edge.models.runtime import ModelRuntime
from edgefed.edge.update_sender import DeviceCredentials

# A device's residual (it must carry over from round to round: ErrorFeedback keeps it in its file too), the adapter
# it holds and its installed model, for the devices this process served last: a simulation's actor serves many in
# turn, and one device's tasks run in whichever actor is free, so an entry whose files another process has replaced
# since is made anew (`valid`).
DEVICES_HELD = 16
_FEEDBACK: Lru[str, ErrorFeedback] = Lru(DEVICES_HELD)
_RUNTIMES: Lru[tuple[str, str], ModelRuntime] = Lru(DEVICES_HELD)
_HELD: Lru[str, HeldAdapter] = Lru(DEVICES_HELD)


@dataclass(frozen=True)
class NodeIdentity:
    device_id: str
    key_dir: Path
    aggregator_public_path: Path
    state_dir: Path
    cloud_public_path: Path  # the pinned key that signs published models
    ca_cert_path: Path | None = None  # the fleet CA the device pins for TLS
    capabilities: dict[str, float] = field(default_factory=dict)

    @classmethod
    def for_context(cls, cfg: EdgefedConfig, context: Context) -> NodeIdentity:
        node_config = context.node_config
        keys = Path(cfg.keys_root)
        if "device-id" in node_config:
            device = str(node_config["device-id"])
        else:
            device = f"client-{int(node_config.get('partition-id', 0))}"
        # Per device, so two devices never share a residual.
        state_default = (Path(cfg.data_dir) if cfg.data_dir else Path(".")) / "devices" / device
        return cls(
            device,
            Path(str(node_config.get("key-dir", keys / "devices" / device))),
            Path(str(node_config.get("aggregator-public-key", keys / "cloud"))),
            Path(str(node_config.get("state-dir", state_default))),
            Path(str(node_config.get("cloud-public-key", keys / "cloud"))),
            Path(str(node_config["ca-cert"])) if "ca-cert" in node_config else None,
            capabilities_of(node_config),
        )

    def ca_cert(self, cfg: EdgefedConfig) -> Path | None:
        """The CA that signs the model service's certificate: the node's own, else the run's (simulation)."""
        if self.ca_cert_path is not None:
            return self.ca_cert_path
        return Path(cfg.tls_dir) / "ca.crt" if cfg.tls_dir else None

    def credentials(self) -> DeviceCredentials:
        return DeviceCredentials(self.device_id, load_device_key(self.key_dir), load_aggregator_public(self.aggregator_public_path))

    def request_signer(self) -> DeviceSigner:
        """Signs this device's calls to the model service with its device key."""
        return DeviceSigner(self.device_id, load_device_key(self.key_dir))

    def base_fetcher(self, cfg: EdgefedConfig, address: str) -> BaseFetcher:
        """Fetches and checks the frozen base this device runs (`<state-dir>/bases/`) from the model service at
        `address`, trusting only the pinned cloud key; close it when done."""
        return BaseFetcher(self.state_dir, address, self.request_signer(), load_cloud_public(self.cloud_public_path),
                           self.ca_cert(cfg))

    def model_runtime(self, cfg: EdgefedConfig) -> ModelRuntime:
        """The device's installed model of the run's federation (one runtime per device, federation and process)."""
        return _RUNTIMES.get((str(self.state_dir), cfg.federation), lambda: ModelRuntime(
            self.state_dir / "models", load_cloud_public(self.cloud_public_path), threads=cfg.client_threads,
            feature_config=cfg.feature_config(), federation=cfg.federation), valid=ModelRuntime.is_current)

    def error_feedback(self) -> ErrorFeedback:
        return _FEEDBACK.get(str(self.state_dir), lambda: ErrorFeedback(self.state_dir / "residual.safetensors"),
                             valid=ErrorFeedback.is_current)

    def held_adapter(self) -> HeldAdapter:
        """The global adapter this device last received: what a downlink delta applies to."""
        return _HELD.get(str(self.state_dir), lambda: HeldAdapter(self.state_dir / "global_adapter.safetensors"),
                         valid=HeldAdapter.is_current)
