"""`edgefed cloud`: global training, the service, its status, and the fleet (enrol, revoke, rollback)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from edgefed.commands.shared import console, fail, run_config, setup_logging, until_signal
from edgefed.common.config import ConfigError, EdgefedConfig, redact_url

cloud_app = typer.Typer(no_args_is_help=True, help="The cloud side: the service, the fleet, global training.")


@cloud_app.command("train")
def cloud_train(
    out: Annotated[Path, typer.Option("--out", help="trainer_checkpoint.pt, trainer.jsonl and the base checkpoint "
                                                    "directory checkpoint/ go here.")],
    features: Annotated[Optional[Path], typer.Option(help="A features file (common/data/features.py format).")] = None,
    manifest: Annotated[Optional[Path], typer.Option(help="The cloud's clips (metadata.jsonl); features are "
                                                          "extracted once, cached, by rank 0.")] = None,
    cache: Annotated[Path, typer.Option(help="Feature cache for --manifest.")] = Path("cache/features"),
    set_: Annotated[list[str], typer.Option("--set", help="Run-config key=value (trainer-steps, trainer-batch-size, ...).")] = [],  # noqa: B006
) -> None:
    """Pretrain the base model on the cloud's data with DDP (run under torchrun for several ranks).

    torchrun --nproc-per-node 2 -m edgefed.cli cloud train --manifest data/cloud.jsonl --out runs/warm
    """
    from edgefed.cloud.training.ddp_trainer import TrainerConfigError, train
    from edgefed.common.data.features import FeatureFileError, load_features
    from edgefed.common.encoders import EncoderCheckpointError
    from edgefed.common.model.base_checkpoint import BaseCheckpointError, federation_settings

    cfg = run_config(set_)
    if (features is None) == (manifest is None):
        fail("give exactly one of --features or --manifest")
    path = features or _cloud_features(cfg, manifest, cache, out)
    try:
        data = load_features(path)
        summary, model = train(cfg, data, out)
    except (FeatureFileError, TrainerConfigError, BaseCheckpointError, EncoderCheckpointError) as err:
        fail(str(err))
    if os.environ.get("RANK", "0") == "0":
        console.print(f"trained {summary.steps} steps on {summary.world_size} {summary.device} rank(s): "
                      f"{summary.samples_per_s:.1f} samples/s, final loss {summary.final_loss:.4f}")
        if summary.base_checkpoint is not None:
            settings = " ".join(f"--set {pair}" for pair in federation_settings(summary.base_checkpoint, model))
            console.print(f"base checkpoint {summary.base_checkpoint}; federate from it with the model settings of "
                          f"this run and: {settings}", soft_wrap=True)


def _cloud_features(cfg: EdgefedConfig, manifest: Path, cache: Path, out: Path) -> Path:
    """Rank 0 extracts (through the edge media pipeline's cache); the other ranks wait for the file."""
    target = out / "features.safetensors"
    if os.environ.get("RANK", "0") == "0":
        from edgefed.common.data.clip_manifest import read_manifest
        from edgefed.common.data.features import save_features
        from edgefed.edge.dataset import build_features

        data, errors = build_features(read_manifest(manifest), cfg, cache)
        for err in errors:
            console.print(f"[yellow]skipped[/] {err.path}: {err.reason}")
        if data is None:
            fail(f"{manifest}: no readable clips")
        out.mkdir(parents=True, exist_ok=True)
        save_features(data, target)
    else:
        deadline = time.monotonic() + 3600
        while not target.exists():
            if time.monotonic() > deadline:
                fail(f"rank {os.environ.get('RANK')}: {target} did not appear")
            time.sleep(1.0)
    return target


@cloud_app.command("serve")
def cloud_serve(
    config: Annotated[Path, typer.Option(help="The service's config: run-config keys (see deploy/cloud.toml).")],
    set_: Annotated[list[str], typer.Option("--set", help="Override a config key: key=value (repeatable).")] = [],  # noqa: B006
    app_dir: Annotated[Optional[Path], typer.Option(help="The edgefed source folder (default: this install's).")] = None,
    external_superlink: Annotated[bool, typer.Option(help="Use the SuperLink already running at `superlink` (start it with "
                                                       "`python -m edgefed.cloud.fleet.superlink_gate`, or its Control API is open).")] = False,
) -> None:
    """Run the cloud: SuperLink, the async aggregator on Redis, the model service (and the trainer), until stopped."""
    from edgefed.cloud.fleet.service import CloudService, ServiceError, default_app_dir, load_service_config
    from edgefed.cloud.fleet.superlink import SuperLinkError

    setup_logging(verbose=True)
    try:
        cfg = load_service_config(config, set_)
    except ConfigError as err:
        fail(str(err))
    service = CloudService(cfg, app_dir or default_app_dir(), external_superlink)
    try:
        service.start()
    except (ServiceError, SuperLinkError) as err:
        service.stop()
        fail(str(err))
    console.print(f"[bold]edgefed cloud[/] federation {cfg.federation}: SuperLink {cfg.superlink}, model service "
                  f"{service.model_server.address if service.model_server else '-'}, state {redact_url(cfg.state_store)}; "
                  f"run directory {service.run.path} (Ctrl-C stops)")
    until_signal(service.supervise, service.stop_event, service.stop)


@cloud_app.command("status")
def cloud_status(
    config: Annotated[Path, typer.Option(help="The service's config file.")],
    set_: Annotated[list[str], typer.Option("--set", help="Override a config key: key=value.")] = [],  # noqa: B006
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Versions, devices seen, updates accepted and rejected, the last export, nodes online."""
    from edgefed.cloud.fleet.operations import service_problems, status
    from edgefed.cloud.fleet.service import load_service_config

    try:
        cfg = load_service_config(config, set_)
    except ConfigError as err:
        fail(str(err))
    report = status(cfg)
    if as_json:
        print(json.dumps(report, indent=1, default=str))
    else:
        _print_status(report)
    # non-zero for health checks: the service is not running (or failing), or Redis or the SuperLink is unreachable
    problems = service_problems(report)
    if problems:
        Console(stderr=True).print(f"[bold red]unhealthy:[/] {'; '.join(problems)}")
        raise typer.Exit(code=1)


def _print_status(report: dict) -> None:
    service = report.get("service") or {}
    export = report.get("last_export") or {}
    alive = "" if service.get("responding", True) else " [red]but not responding[/] (is `edgefed cloud serve` running?)"
    console.print(f"service: {service.get('state', 'not running')}{alive} (Flower run {service.get('flower_run', '-')}, "
                  f"restarts {service.get('restarts', 0)})")
    console.print(f"version {report.get('version', '-')}, last accuracy {report.get('last_accuracy')}, "
                  f"updates accepted {report['updates_accepted']}, rejected {report.get('updates_rejected', {})}, "
                  f"buffer {report.get('buffer_depth', '-')}")
    devices = report.get("devices_seen") or {}
    console.print(f"nodes {report['nodes']}; devices seen {len(devices)}")
    for device, seen in sorted(devices.items()):
        caps = ", ".join(f"{k} {v:g}" for k, v in seen.items() if k.startswith("device-"))
        console.print(f"  {device}: last version {seen.get('last_version', '-')}{'; ' + caps if caps else ''}")
    console.print(f"last export: v{export.get('version', '-')} published={export.get('published', '-')} "
                  f"{export.get('size_bytes', 0) / 1e6:.2f} MB" if export else "last export: none")
    console.print(f"devices are offered model v{report['published_version']}")


@cloud_app.command("enrol")
def cloud_enrol(
    config: Annotated[Path, typer.Option(help="The service's config file.")],
    device_id: Annotated[str, typer.Option(help="The device's id (its agent config device-id).")],
    keys: Annotated[Path, typer.Option(help="The device's public keys: device_ed25519.pub and node_auth.pub.")],
) -> None:
    """Admit a device: its node key at the SuperLink, its signing key in the aggregator's registry."""
    from edgefed.cloud.fleet.operations import enrol
    from edgefed.cloud.fleet.service import load_service_config
    from edgefed.cloud.fleet.superlink import SuperLinkError
    from edgefed.common.keys import KeyMaterialError

    try:
        node_id = enrol(load_service_config(config, []), device_id, keys)
    except (ConfigError, SuperLinkError, KeyMaterialError, OSError) as err:
        fail(str(err))
    console.print(f"enrolled {device_id} as Flower node {node_id}")


@cloud_app.command("revoke")
def cloud_revoke(
    config: Annotated[Path, typer.Option(help="The service's config file.")],
    device_id: Annotated[str, typer.Option(help="The device to refuse from now on.")],
) -> None:
    """Refuse a device: unregister its node key and remove its signing key."""
    from edgefed.cloud.fleet.operations import revoke
    from edgefed.cloud.fleet.service import load_service_config
    from edgefed.cloud.fleet.superlink import SuperLinkError

    try:
        removed = revoke(load_service_config(config, []), device_id)
    except (ConfigError, SuperLinkError) as err:
        fail(str(err))
    if not removed:
        fail(f"{device_id} is not enrolled")
    console.print(f"revoked {device_id}")


@cloud_app.command("rollback")
def cloud_rollback(
    config: Annotated[Path, typer.Option(help="The service's config file.")],
    to_version: Annotated[int, typer.Option(help="A published version still in the registry (it keeps the last 5).")],
) -> None:
    """Roll the fleet back: publish the model of an earlier version again, as a new version devices install."""
    from edgefed.cloud.fleet.service import load_service_config, rollback_fleet
    from edgefed.cloud.publishing.registry import UnknownModelError
    from edgefed.common.keys import KeyMaterialError
    from edgefed.common.wire.model_manifest import ModelVerificationError

    try:
        version = rollback_fleet(load_service_config(config, []), to_version)
    except (ConfigError, UnknownModelError, KeyMaterialError, ModelVerificationError, ValueError) as err:
        fail(str(err))
    console.print(f"the model of v{to_version} is published again as v{version}; devices install it on the next push "
                  "(a later export supersedes it: stop the federation or raise export-every to hold it)")
