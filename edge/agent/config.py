"""What an edge agent needs to know about its device: one TOML file (deploy/edge.toml).

This is the device's side, Flower's *node config*: who the device is, where its
keys, state and media live, and how to reach the cloud. How the federation
trains is the run config (common/config.py), which the cloud sends with every
instruction. Relative paths are relative to the file's folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import psutil

from edgefed.common.config import ConfigError, EdgefedConfig, MediaLimits, read_toml
from edgefed.common.wire.capabilities import DEVICE_CORES, DEVICE_MEMORY_MB


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    superlink: str  # host:port of the cloud's SuperLink
    model_service: str  # host:port of the cloud's model service
    key_dir: Path  # device_ed25519.key and node_auth.key (`edgefed keys init --role edge`)
    cloud_keys: Path  # the cloud's public keys the device pins: aggregator_x25519.pub, cloud_ed25519.pub
    state_dir: Path  # feature cache, manifests, error-feedback residual, installed models
    inbox: Path  # new media: inbox/<label>/<clip>; files directly in inbox/ are not trained on
    ca_cert: Path | None = None  # the fleet CA (TLS); None: plaintext (only with an --insecure SuperLink)
    cores: int = 0  # cores offered for training (0: all but one)
    memory_mb: int = 0  # memory offered (0: what the device has): edge/training/plan.py fits training into it
    extract_cpu_share: float = 0.5  # of one core, for background feature extraction
    extract_memory_mb: int = 3072  # address space of the process that decodes inbox files (imports included)
    heldout_share: float = 0.2  # of labelled clips kept for evaluating on the device
    scan_every_s: float = 10.0
    runtime_port: int = 0  # the SuperNode's local Runtime API (0: a free port)
    metrics_port: int = 0  # Prometheus metrics of the agent (0: off)
    metrics_bind: str = "127.0.0.1"  # where the metrics endpoint listens (0.0.0.0 in a container that is scraped)
    features: tuple[tuple[str, object], ...] = ()  # run-config feature keys, when the fleet changed them
    media_limits: tuple[tuple[str, object], ...] = ()  # run-config max-media-* keys: what this device decodes
    # Fork each ClientApp from an idle process with torch & co. loaded (saves their import, 5-10 s of CPU a task)
    # at the cost of that process's memory between tasks (about 0.5 GB); false on a device short of memory.
    warm_clientapp: bool = True

    @classmethod
    def from_file(cls, path: str | Path) -> AgentConfig:
        path = Path(path)
        raw = read_toml(path, "agent config")
        known = {f.name: f for f in fields(cls)}
        values: dict[str, object] = {}
        for key, value in raw.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"{path}: unknown agent config key {key!r}")
            values[name] = value
        missing = [k for k in ("device_id", "superlink", "model_service", "key_dir", "cloud_keys", "state_dir", "inbox")
                   if k not in values]
        if missing:
            raise ConfigError(f"{path}: missing {', '.join(m.replace('_', '-') for m in missing)}")
        root = path.resolve().parent
        for name in ("key_dir", "cloud_keys", "state_dir", "inbox", "ca_cert"):
            if name in values:
                p = Path(str(values[name]))
                values[name] = p if p.is_absolute() else root / p
        values["features"] = tuple(sorted(dict(values.get("features", {})).items()))  # type: ignore[arg-type]
        values["media_limits"] = tuple(sorted(dict(values.get("media_limits", {})).items()))  # type: ignore[arg-type]
        limit_keys = {f.name.replace("_", "-") for f in fields(MediaLimits)}
        unknown = [k for k, _ in values["media_limits"] if k not in limit_keys]  # type: ignore[union-attr]
        if unknown:
            raise ConfigError(f"{path}: [media-limits] takes {', '.join(sorted(limit_keys))}; not {', '.join(unknown)}")
        cfg = cls(**values)  # type: ignore[arg-type]
        cfg.feature_config()  # unknown or invalid feature keys and limits fail here
        if not 0.0 < cfg.extract_cpu_share <= 1.0:
            raise ConfigError(f"extract-cpu-share must be in (0, 1], got {cfg.extract_cpu_share}")
        if not 0.0 <= cfg.heldout_share < 1.0:
            raise ConfigError(f"heldout-share must be in [0, 1), got {cfg.heldout_share}")
        if cfg.extract_memory_mb < 256:
            raise ConfigError(f"extract-memory-mb must be at least 256 (the extractor's imports), got "
                              f"{cfg.extract_memory_mb}")
        return cfg

    def feature_config(self) -> EdgefedConfig:
        """The extractor settings: the run config's defaults, with this device's `[features]` and
        `[media-limits]` tables."""
        return EdgefedConfig().with_overrides([f"{k}={v}" for k, v in (*self.features, *self.media_limits)])

    @property
    def offered_cores(self) -> int:
        return self.cores or max((os.cpu_count() or 1) - 1, 1)

    @property
    def offered_memory_mb(self) -> int:
        return self.memory_mb or int(psutil.virtual_memory().total / 2**20)

    # --- the state folder ----------------------------------------------------------------
    @property
    def cache_dir(self) -> Path:
        return self.state_dir / "cache"

    @property
    def train_manifest(self) -> Path:
        return self.state_dir / "train.jsonl"

    @property
    def heldout_manifest(self) -> Path:
        return self.state_dir / "heldout.jsonl"

    def node_config(self) -> dict[str, str | int]:
        """What the SuperNode hands the ClientApp (edge/identity.py and edge/node_data.py read it)."""
        config: dict[str, str | int] = {
            "device-id": self.device_id, "key-dir": str(self.key_dir), "state-dir": str(self.state_dir),
            "aggregator-public-key": str(self.cloud_keys), "cloud-public-key": str(self.cloud_keys),
            "train-manifest": str(self.train_manifest), "heldout-manifest": str(self.heldout_manifest),
            "cache-dir": str(self.cache_dir),
            DEVICE_CORES: self.offered_cores, DEVICE_MEMORY_MB: self.offered_memory_mb,
        }
        if self.ca_cert is not None:
            config["ca-cert"] = str(self.ca_cert)
        return config


def write_agent_config(device_dir: Path, device_id: str, superlink: str, model_service: str, ca_cert: Path | None,
                       cloud_keys: Path) -> Path:
    """A device's edge.toml (paths absolute, so the agent can start from anywhere)."""
    lines = [f"device-id = {json.dumps(device_id)}", f"superlink = {json.dumps(superlink)}",
             f"model-service = {json.dumps(model_service)}", 'key-dir = "keys"',
             f"cloud-keys = {json.dumps(str(cloud_keys.resolve()))}", 'state-dir = "state"', 'inbox = "inbox"']
    if ca_cert is not None:
        lines.append(f"ca-cert = {json.dumps(str(ca_cert.resolve()))}")
    lines += ["# cores = 0            # offered for training (0: all but one)",
              "# memory-mb = 0        # offered for training (0: all it has); the device plans its base",
              "#                      # precision and batch for it, or refuses the model with its reason",
              "# extract-cpu-share = 0.5",
              "# extract-memory-mb = 3072  # the inbox decodes in a child process limited to this",
              "# warm-clientapp = true  # fork ClientApps from a process with torch loaded (~0.5 GB between tasks)",
              "# [features]           # only if the fleet changed the run config's feature keys",
              "# image-size = 112",
              "# [media-limits]       # what this device agrees to decode from one inbox file",
              "# max-media-pixels = 8294400", "# max-media-duration-s = 10800.0", "# max-media-frames = 500000",
              "# max-media-seconds = 600.0"]
    path = device_dir / "edge.toml"
    (device_dir / "inbox").mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
