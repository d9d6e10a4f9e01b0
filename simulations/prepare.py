"""Prepare a simulation's data: clips (generated or given), partitions, central features."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgefed.common.config import EdgefedConfig
from edgefed.common.data.clip_manifest import read_manifest, write_manifest
from edgefed.common.data.features import save_features
from edgefed.common.data.layout import DataLayout
from edgefed.common.keys import AGGREGATOR_KEY, DEVICE_KEY, DeviceRegistry, init_keys, load_device_key
from edgefed.edge.dataset import build_features
from edgefed.simulations.partition import dirichlet_partition, label_skew
from edgefed.simulations.synthetic import SyntheticSpec, generate

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


class PreparationError(RuntimeError):
    """The data cannot support the requested simulation (too few clips, all unreadable...)."""


@dataclass
class PreparedData:
    layout: DataLayout
    clips: int
    central_clips: int
    label_skew: float
    skipped: int  # central clips that failed extraction


def fill_inboxes(layout: DataLayout, num_clients: int, devices_dir: Path) -> dict[str, int]:
    """Demo fleets: client i's clips (train and held-out) into `<devices_dir>/device-i/inbox/<label>/`.

    A real device's media arrives in its inbox the same way; the edge agent
    extracts it from there (edge/agent/inbox.py). Returns clips copied per device."""
    copied: dict[str, int] = {}
    for i in range(num_clients):
        device = f"device-{i}"
        copied[device] = 0
        for manifest in (layout.client_train(i), layout.client_heldout(i)):
            for entry in read_manifest(manifest):
                dest = devices_dir / device / "inbox" / entry.label / entry.path.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                if not dest.exists():
                    shutil.copyfile(entry.path, dest)
                copied[device] += 1
    return copied


def enrol_devices(key_root: Path, num_clients: int) -> None:
    """Cloud keys plus one signing key per simulated device, registered with the cloud.

    Existing keys are kept, so a prepared data dir can be reused.
    """
    cloud = key_root / "cloud"
    if not (cloud / f"{AGGREGATOR_KEY}.key").exists():
        init_keys("cloud", cloud)
    registry = DeviceRegistry(cloud / "registry.json")
    for i in range(num_clients):
        device = f"client-{i}"
        folder = key_root / "devices" / device
        if not (folder / f"{DEVICE_KEY}.key").exists():
            init_keys("edge", folder)
        if device not in registry:
            registry.register(device, load_device_key(folder).public_key())


def prepare(
    data_dir: str | Path,
    cfg: EdgefedConfig,
    num_clients: int,
    alpha: float,
    manifest: str | Path | None = None,
    synthetic: SyntheticSpec | None = None,
    synthetic_dir: str | Path | None = None,
    progress: Progress | None = None,
    client_features: bool = True,
) -> PreparedData:
    """Write partitions and central held-out features under `data_dir`.

    Without a manifest, synthetic clips are generated into `synthetic_dir`
    (reused when the spec matches) and their manifest is used. With
    `client_features`, every client's clips are extracted into the shared
    feature cache too (for a simulation; edge agents extract their own).
    """
    layout = DataLayout(Path(data_dir))
    if manifest is None:
        spec = synthetic or SyntheticSpec(seed=cfg.seed)
        target = Path(synthetic_dir) if synthetic_dir else layout.root / "synthetic"
        manifest = generate(target, spec, (lambda i, n: progress("generate clips", i, n)) if progress else None)
    entries = read_manifest(manifest)
    unknown = sorted({e.label for e in entries} - set(cfg.label_names))
    if unknown:
        raise PreparationError(f"{manifest}: labels {unknown} are not in the run's labels {cfg.label_names}")
    write_manifest(layout.manifest, entries)
    try:
        partition = dirichlet_partition(entries, num_clients, alpha, seed=cfg.seed)
    except ValueError as err:
        raise PreparationError(str(err)) from None
    partition.write(layout.partitions)
    if progress:
        progress("central features", 0, 1)
    features, errors = build_features(partition.central, cfg, layout.cache)
    if features is None:
        raise PreparationError(f"none of the {len(partition.central)} central held-out clips could be read")
    save_features(features, layout.central_features)
    # the extraction report: which central clips failed and why
    report = [{"path": e.path, "reason": e.reason} for e in errors]
    (layout.root / "extraction_report.json").write_text(json.dumps(report, indent=1) + "\n")
    if progress:
        progress("central features", 1, 1)
    # every client's clips into the shared feature cache now, in this one process: a simulated device's first task
    # then reads its features instead of decoding video in a ClientApp process beside the others
    clips = [e for client in partition.clients for split in (client.train, client.heldout) for e in split]
    for start in range(0, len(clips) if client_features else 0, 256):
        if progress:
            progress("client features", start, len(clips))
        build_features(clips[start: start + 256], cfg, layout.cache)  # failures are each client's to report
    if progress and client_features:
        progress("client features", len(clips), len(clips))
    enrol_devices(Path(cfg.key_dir) if cfg.key_dir else layout.root / "keys", num_clients)
    return PreparedData(layout, len(entries), len(features), label_skew(partition), len(errors))
