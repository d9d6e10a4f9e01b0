"""The `edgefed` command line."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgefed.common.config import ConfigError, EdgefedConfig, redact_url

if TYPE_CHECKING:
    from edgefed.simulations.prepare import PreparedData
    from edgefed.simulations.synthetic import SyntheticSpec

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated edge-cloud training for video and audio.")
console = Console()

DEFAULT_CLIENTS = 4
DEFAULT_CLIPS = 400


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


def _config(overrides: list[str], **fields: object) -> EdgefedConfig:
    try:
        cfg = EdgefedConfig().with_overrides(overrides)
        return cfg.replace(**{k: v for k, v in fields.items() if v is not None})
    except ConfigError as err:
        _fail(str(err))
        raise  # unreachable


@app.command()
def prepare(
    out: Annotated[Path, typer.Option("--out", help="Data directory to write.")] = Path("data/demo"),
    clients: Annotated[int, typer.Option(help="Number of simulated devices.")] = DEFAULT_CLIENTS,
    alpha: Annotated[float, typer.Option(help="Dirichlet label-skew alpha (small = more skew).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed for generation and partitioning.")] = 0,
    manifest: Annotated[Optional[Path], typer.Option(help="Your metadata.jsonl; default: synthetic clips.")] = None,
    clips: Annotated[int, typer.Option(help="Synthetic clips to generate.")] = DEFAULT_CLIPS,
    set_: Annotated[list[str], typer.Option("--set", help="Run-config override key=value.")] = [],  # noqa: B006
    inboxes: Annotated[Optional[Path], typer.Option(help="Also copy client i's clips into INBOXES/device-i/inbox/<label>/ "
                                                         "(media for edge agents of a demo fleet).")] = None,
) -> None:
    """Generate (or take) clips, partition them, and extract the server's held-out features."""
    from edgefed.simulations.prepare import fill_inboxes
    from edgefed.simulations.synthetic import SyntheticSpec

    cfg = _config(set_, seed=seed)
    data = _prepare(cfg, out.resolve(), clients, alpha, manifest, SyntheticSpec(num_clips=clips, seed=seed))
    console.print(f"prepared {data.clips} clips for {clients} clients in {out} (label skew {data.label_skew:.2f})")
    if inboxes is not None:
        for device, count in fill_inboxes(data.layout, clients, inboxes).items():
            console.print(f"  {count} clips in {inboxes / device / 'inbox'}")
        return
    console.print("run the same app with Flower's CLI:")
    console.print(
        f"  FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flwr run . local "
        f"--run-config \"data-dir='{out.resolve()}' min-clients={clients}\" "
        f"--federation-config \"num-supernodes={clients}\" --stream",
        soft_wrap=True,
    )


def _prepare(cfg: EdgefedConfig, data_dir: Path, clients: int, alpha: float, manifest: Optional[Path],
             spec: SyntheticSpec, synthetic_dir: Optional[Path] = None) -> PreparedData:
    from edgefed.simulations.prepare import PreparationError
    from edgefed.simulations.prepare import prepare as prepare_data

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        try:
            return prepare_data(data_dir, cfg, clients, alpha, manifest, spec, synthetic_dir, report)
        except (PreparationError, OSError, ValueError) as err:
            _fail(str(err))


@app.command()
def simulate(
    clients: Annotated[int, typer.Option(help="Simulated devices (Flower SuperNodes).")] = DEFAULT_CLIENTS,
    mode: Annotated[Optional[str], typer.Option(help="async (FedBuff, the default) or sync (FedAvg rounds).")] = None,
    versions: Annotated[Optional[int], typer.Option(help="Async: global versions to publish (default: max-versions).")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="Sync: federated rounds (default: num-rounds).")] = None,
    profile: Annotated[Optional[str], typer.Option(help="Device profile: uniform, mobile-skewed, flaky.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for data, partitioning and training.")] = 0,
    out: Annotated[Path, typer.Option("--out", help="Folder for run directories.")] = Path("runs"),
    alpha: Annotated[float, typer.Option(help="Dirichlet label-skew alpha (small = more skew).")] = 1.0,
    manifest: Annotated[Optional[Path], typer.Option(help="Your metadata.jsonl; default: synthetic clips.")] = None,
    clips: Annotated[int, typer.Option(help="Synthetic clips to generate.")] = DEFAULT_CLIPS,
    run_id: Annotated[Optional[str], typer.Option(help="Run directory name (default: timestamped).")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Run-config override key=value (repeatable).")] = [],  # noqa: B006
    verbose: Annotated[bool, typer.Option(help="Show Flower's and Ray's logs.")] = False,
) -> None:
    """Run a local multi-client federation end to end and print accuracy per version (or round)."""
    from edgefed.common.run_dir import new_run_id
    from edgefed.simulations.runner import run_federation
    from edgefed.simulations.synthetic import SyntheticSpec

    _setup_logging(verbose)
    rid = run_id or new_run_id()
    cfg = _config(set_, seed=seed, mode=mode, max_versions=versions, num_rounds=rounds, device_profile=profile,
                  out_dir=str(out), run_id=rid, min_clients=clients)
    run_path = out / rid
    spec = SyntheticSpec(num_clips=clips, seed=seed)
    data = _prepare(cfg, (run_path / "data").resolve(), clients, alpha, manifest, spec,
                    synthetic_dir=(out / "datasets" / f"synthetic-n{clips}-s{seed}").resolve())
    cfg = cfg.replace(data_dir=str(data.layout.root))
    unit, steps = ("version", cfg.max_versions) if cfg.mode == "async" else ("round", cfg.num_rounds)
    console.print(f"[bold]edgefed simulate[/] run {rid}: {clients} clients, {cfg.mode} mode, {steps} {unit}s, "
                  f"devices {cfg.device_profile}, {data.clips} clips (label skew {data.label_skew:.2f})")

    start = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task(f"{unit}s", total=steps)

        def on_round(record: dict) -> None:
            acc = record.get("accuracy")
            bar.update(task, completed=record["round"],
                       description=f"{unit} {record['round']}: accuracy {'-' if acc is None else f'{acc:.3f}'}")

        try:
            run = run_federation(cfg, clients, on_round=on_round, verbose=verbose)
        except RuntimeError as err:
            _fail(str(err))
    _print_result(run.path, time.perf_counter() - start)
    from edgefed.cloud.reports.report import build_report

    console.print(f"report: {build_report([run.path]).resolve()} (open it in a browser)")


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories; several are overlaid, labelled by how their configs differ.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Where to write (default: report.html in the first run directory).")] = None,
) -> None:
    """Write a self-contained report.html: accuracy, bytes, staleness, participation, rejections, models, config."""
    from edgefed.cloud.reports.report import ReportError, build_report

    try:
        path = build_report(run_dirs, out)
    except ReportError as err:
        _fail(str(err))
    console.print(f"wrote {path.resolve()}")


@app.command()
def extract(
    paths: Annotated[list[Path], typer.Argument(help="Video files or folders (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("extracted"),
    contact_sheet: Annotated[bool, typer.Option("--contact-sheet", help="Also write a PNG grid per video.")] = False,
    set_: Annotated[list[str], typer.Option("--set", help="Extractor setting key=value (run-config keys).")] = [],  # noqa: B006
) -> None:
    """Write keyframe JPEGs and a JSON index (shots, keyframes, audio windows, errors) per video."""
    from edgefed.edge.extract import extract_all, find_media

    cfg = _config(set_)
    files = find_media(paths)
    if not files:
        _fail("no media files found in " + ", ".join(map(str, paths)))
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("extracting", total=len(files))

        def report(done: int, total: int, outcome) -> None:  # noqa: ANN001
            bar.update(task, completed=done, description=f"extracting {Path(outcome.path).name}")
            if not outcome.ok:
                bar.console.print(f"[yellow]skipped[/] {outcome.path}: {outcome.reason}")

        outcomes = extract_all(files, out, cfg, contact_sheet, report)
    ok = [o for o in outcomes if o.ok]
    console.print(f"{len(ok)} of {len(outcomes)} files extracted into {out} "
                  f"({sum(o.keyframes for o in ok)} keyframes); report: {out / 'report.json'}")
    if not ok:
        _fail(f"every file failed ({len(outcomes)}); see the reasons above")


@app.command()
def infer(
    paths: Annotated[list[Path], typer.Argument(help="Video or audio files, or folders (searched recursively).")],
    model_dir: Annotated[Path, typer.Option("--model-dir", help="The device's model folder (holds `current`).")] = Path(
        "state/models"),
    cloud_key: Annotated[Path, typer.Option("--cloud-key", help="Pinned cloud signing key (.pub or its folder).")] = Path(
        "keys/cloud"),
    threads: Annotated[int, typer.Option(help="onnxruntime threads.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Per-shot predictions of the installed (signed, verified) ONNX model, with timestamps."""
    from edgefed.common.keys import KeyMaterialError, load_cloud_public
    from edgefed.edge.extract import find_media
    from edgefed.edge.models.inference import as_json as predictions_json
    from edgefed.edge.models.inference import predict_files
    from edgefed.edge.models.runtime import ModelRuntime

    try:
        runtime = ModelRuntime(model_dir, load_cloud_public(cloud_key), threads=threads)
    except KeyMaterialError as err:
        _fail(str(err))
    if runtime.active is None:
        _fail(f"{model_dir}: no verified model installed (a device installs pushed models; see README)")
    files = find_media(paths)
    if not files:
        _fail("no media files found in " + ", ".join(map(str, paths)))
    # The device extracts exactly what the model was trained on: the signed manifest's feature config.
    cfg = _config([], **runtime.active.manifest.feature_config)
    predictions, failures = predict_files(files, runtime, cfg)
    if as_json:
        print(json.dumps(predictions_json(predictions, failures), indent=1))
    else:
        table = Table(title=f"model v{runtime.version} ({runtime.active.manifest.quantization})")
        for col in ("file", "shot", "start s", "end s", "prediction", "confidence"):
            table.add_column(col, justify="left" if col in ("file", "prediction") else "right")
        for p in predictions:
            table.add_row(Path(p.path).name, str(p.shot), f"{p.start_s:.2f}", f"{p.end_s:.2f}", p.label,
                          f"{p.confidence:.3f}")
        console.print(table)
        for f in failures:
            console.print(f"[yellow]skipped[/] {f.path}: {f.reason}")
    if not predictions:
        raise typer.Exit(code=1)


cloud_app = typer.Typer(no_args_is_help=True, help="The cloud side: the service, the fleet, global training.")
app.add_typer(cloud_app, name="cloud")


@cloud_app.command("train")
def cloud_train(
    out: Annotated[Path, typer.Option("--out", help="Checkpoints, trainer.jsonl and base.safetensors go here.")],
    features: Annotated[Optional[Path], typer.Option(help="A features file (common/features.py format).")] = None,
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

    cfg = _config(set_)
    if (features is None) == (manifest is None):
        _fail("give exactly one of --features or --manifest")
    path = features or _cloud_features(cfg, manifest, cache, out)
    try:
        data = load_features(path)
        summary, _ = train(cfg, data, out)
    except (FeatureFileError, TrainerConfigError) as err:
        _fail(str(err))
    if os.environ.get("RANK", "0") == "0":
        console.print(f"trained {summary.steps} steps on {summary.world_size} {summary.device} rank(s): "
                      f"{summary.samples_per_s:.1f} samples/s, final loss {summary.final_loss:.4f}; "
                      f"base weights {out / 'base.safetensors'} (use --set base-checkpoint=...)")


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
            _fail(f"{manifest}: no readable clips")
        out.mkdir(parents=True, exist_ok=True)
        save_features(data, target)
    else:
        deadline = time.monotonic() + 3600
        while not target.exists():
            if time.monotonic() > deadline:
                _fail(f"rank {os.environ.get('RANK')}: {target} did not appear")
            time.sleep(1.0)
    return target


@cloud_app.command("serve")
def cloud_serve(
    config: Annotated[Path, typer.Option(help="The service's config: run-config keys (see deploy/cloud.toml).")],
    set_: Annotated[list[str], typer.Option("--set", help="Override a config key: key=value (repeatable).")] = [],  # noqa: B006
    app_dir: Annotated[Optional[Path], typer.Option(help="The edgefed source folder (default: this install's).")] = None,
    external_superlink: Annotated[bool, typer.Option(help="Use the SuperLink already running at `superlink`.")] = False,
) -> None:
    """Run the cloud: SuperLink, the async aggregator on Redis, the model service (and the trainer), until stopped."""
    from edgefed.cloud.fleet.service import CloudService, ServiceError, default_app_dir, load_service_config
    from edgefed.cloud.fleet.superlink import SuperLinkError

    _setup_logging(verbose=True)
    try:
        cfg = load_service_config(config, set_)
    except ConfigError as err:
        _fail(str(err))
    service = CloudService(cfg, app_dir or default_app_dir(), external_superlink)
    try:
        service.start()
    except (ServiceError, SuperLinkError) as err:
        service.stop()
        _fail(str(err))
    console.print(f"[bold]edgefed cloud[/] federation {cfg.federation}: SuperLink {cfg.superlink}, model service "
                  f"{service.model_server.address if service.model_server else '-'}, state {redact_url(cfg.state_store)}; "
                  f"run directory {service.run.path} (Ctrl-C stops)")
    try:
        _until_signal(service.supervise, service.stop_event)
    finally:
        service.stop()


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
        _fail(str(err))
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
        _fail(str(err))
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
        _fail(str(err))
    if not removed:
        _fail(f"{device_id} is not enrolled")
    console.print(f"revoked {device_id}")


edge_app = typer.Typer(no_args_is_help=True, help="The device side: the edge agent.")
app.add_typer(edge_app, name="edge")


@edge_app.command("agent")
def edge_agent(
    config: Annotated[Path, typer.Option(help="The device's agent config (see deploy/edge.toml).")],
) -> None:
    """Run this device in the fleet: SuperNode, inbox extraction and model updates, until stopped."""
    from edgefed.edge.agent.config import AgentConfig
    from edgefed.edge.agent.edge_agent import AgentError, EdgeAgent

    _setup_logging(verbose=True)
    try:
        agent = EdgeAgent(AgentConfig.from_file(config)).start()
    except (ConfigError, AgentError) as err:
        _fail(str(err))
    console.print(f"[bold]edgefed edge[/] {agent.cfg.device_id}: SuperLink {agent.cfg.superlink}, inbox "
                  f"{agent.cfg.inbox}, state {agent.cfg.state_dir} (Ctrl-C stops)")
    try:
        _until_signal(agent.supervise, agent.stop_event)
    finally:
        agent.stop()


@edge_app.command("init")
def edge_init(
    dir_: Annotated[Path, typer.Option("--dir", help="The device's folder: keys/, inbox/, state/ and edge.toml go here.")],
    device_id: Annotated[str, typer.Option(help="The device's id (unique in the fleet).")],
    superlink: Annotated[str, typer.Option(help="The cloud's SuperLink, host:port.")] = "127.0.0.1:9093",
    model_service: Annotated[str, typer.Option(help="The cloud's model service, host:port.")] = "127.0.0.1:9300",
    ca_cert: Annotated[Optional[Path], typer.Option(help="The fleet CA certificate (from `edgefed certs`).")] = None,
    cloud_keys: Annotated[Path, typer.Option(help="Folder with the cloud's aggregator_x25519.pub and cloud_ed25519.pub.")] = Path(
        "cloud-keys"),
) -> None:
    """Provision a device: its keys and an agent config; then the operator enrols its public keys."""
    from edgefed.common.keys import KeyMaterialError, init_keys
    from edgefed.edge.agent.config import write_agent_config

    try:
        init_keys("edge", dir_ / "keys")
    except KeyMaterialError as err:
        _fail(str(err))
    config = write_agent_config(dir_, device_id, superlink, model_service, ca_cert, cloud_keys)
    console.print(f"device {device_id}: keys in {dir_ / 'keys'}, config {config}, media goes into {dir_ / 'inbox'}/<label>/")
    console.print(f"enrol it on the cloud: edgefed cloud enrol --config CLOUD.toml --device-id {device_id} "
                  f"--keys {dir_ / 'keys'}")


@edge_app.command("rollback")
def edge_rollback(
    config: Annotated[Path, typer.Option(help="The device's agent config.")],
) -> None:
    """Go back to this device's previous model (the running agent picks it up within seconds)."""
    from edgefed.common.keys import KeyMaterialError, load_cloud_public
    from edgefed.edge.agent.config import AgentConfig
    from edgefed.edge.models.runtime import ModelRejected, ModelRuntime

    try:
        cfg = AgentConfig.from_file(config)
        runtime = ModelRuntime(cfg.state_dir / "models", load_cloud_public(cfg.cloud_keys))
        version = runtime.rollback()
    except (ConfigError, KeyMaterialError, ModelRejected) as err:
        _fail(str(err))
    console.print(f"{cfg.device_id} runs model v{version} again")


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
        _fail(str(err))
    console.print(f"the model of v{to_version} is published again as v{version}; devices install it on the next push "
                  "(a later export supersedes it: stop the federation or raise export-every to hold it)")


def _until_signal(loop: Callable[[], None], stop: threading.Event) -> None:
    """Run `loop` (which returns once `stop` is set) until SIGTERM or SIGINT."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    loop()


@app.command()
def certs(
    dir_: Annotated[Path, typer.Option("--dir", help="Folder for ca.crt/ca.key and server.crt/server.key.")],
    host: Annotated[list[str], typer.Option(help="A name or IP devices use to reach the cloud (repeatable).")] = [
        "127.0.0.1", "localhost"],  # noqa: B006
    days: Annotated[int, typer.Option(help="Validity in days.")] = 365,
) -> None:
    """Make the fleet's TLS certificates: a private CA and the cloud's server certificate."""
    from edgefed.cloud.fleet.certificates import write_fleet_certificates

    for path in write_fleet_certificates(dir_, host, days):
        console.print(f"wrote {path}")
    console.print(f"devices pin {dir_ / 'ca.crt'}; keep {dir_ / 'ca.key'} offline")


keys_app = typer.Typer(no_args_is_help=True, help="Device and cloud key material.")
app.add_typer(keys_app, name="keys")


@keys_app.command("init")
def keys_init(
    role: Annotated[str, typer.Option(help="edge (a device's signing key) or cloud (aggregator and signing keys).")],
    dir_: Annotated[Path, typer.Option("--dir", help="Folder for the key files (private keys get mode 0600).")],
    rotate: Annotated[bool, typer.Option(help="Replace existing keys (a device must then be registered again).")] = False,
) -> None:
    """Create the key pair(s) of a device or of the cloud."""
    from edgefed.common.keys import KeyMaterialError, init_keys

    try:
        files = init_keys(role, dir_, overwrite=rotate)
    except KeyMaterialError as err:
        _fail(str(err))
    for path in files:
        console.print(f"wrote {path}")


@keys_app.command("register")
def keys_register(
    device_id: Annotated[str, typer.Option(help="The device's id (its node config device-id).")],
    public_key: Annotated[Path, typer.Option(help="The device's device_ed25519.pub (or its key folder).")],
    registry: Annotated[Path, typer.Option(help="The cloud's registry.json (in its key folder).")],
) -> None:
    """Add (or replace) a device's public key in the cloud's registry."""
    from edgefed.common.keys import DEVICE_KEY, DeviceRegistry, KeyMaterialError, load_ed25519_public

    path = public_key / f"{DEVICE_KEY}.pub" if public_key.is_dir() else public_key
    try:
        key = load_ed25519_public(path)
        DeviceRegistry(registry).register(device_id, key)
    except KeyMaterialError as err:
        _fail(str(err))
    console.print(f"registered {device_id} in {registry}")


@keys_app.command("revoke")
def keys_revoke(
    device_id: Annotated[str, typer.Option(help="The device to remove.")],
    registry: Annotated[Path, typer.Option(help="The cloud's registry.json.")],
) -> None:
    """Remove a device: its updates are refused from now on."""
    from edgefed.common.keys import DeviceRegistry

    if not DeviceRegistry(registry).revoke(device_id):
        _fail(f"{device_id} is not registered in {registry}")
    console.print(f"revoked {device_id}")


def _print_result(run_path: Path, wall_s: float) -> None:
    from edgefed.common.run_dir import RunDir

    run = RunDir(run_path)
    records = run.read_metrics()
    asynchronous = bool(records) and records[0].get("mode") == "async"
    table = Table(title="per-version results" if asynchronous else "per-round results")
    last = "staleness" if asynchronous else "federated acc"
    for col in ("version" if asynchronous else "round", "central acc", "central loss", last, "updates", "MB up",
                "MB down", "wall s"):
        table.add_column(col, justify="right")
    for r in records:
        fmt = lambda v, p=4: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
        tail = (" ".join(f"{k}:{n}" for k, n in r["staleness_histogram"].items()) if asynchronous
                else fmt(r["federated_accuracy"]))
        table.add_row(str(r["round"]), fmt(r["accuracy"]), fmt(r["loss"]), tail,
                      str(r["clients"]), f"{r['bytes_received'] / 1e6:.2f}", f"{r['bytes_sent'] / 1e6:.2f}",
                      f"{r['wall_s']:.1f}")
    console.print(table)
    summary = run.read_json("summary.json")
    acc = summary.get("final_accuracy")
    console.print(
        f"[bold]done[/] in {wall_s:.0f} s: final accuracy "
        f"{'-' if acc is None else f'{acc:.3f}'} (chance {summary.get('chance_accuracy', 0):.2f}, "
        f"video only {summary.get('video_only_accuracy', 0):.3f}, audio only {summary.get('audio_only_accuracy', 0):.3f}); "
        f"run directory {run.path}"
    )
    deployed = summary.get("deployed_model") or {}
    if deployed.get("published"):
        fed = deployed.get("federated_accuracy")
        console.print(
            f"deployed model v{deployed['version']} ({deployed['quantization']}, {deployed['size_mb']:.2f} MB, "
            f"{deployed['fp32_size_bytes'] / 1e6:.2f} MB in FP32) on {deployed['devices_installed']} of "
            f"{deployed['devices']} devices: federated accuracy {'-' if fed is None else f'{fed:.3f}'} "
            f"(what devices get from the ONNX model), cloud held-out {deployed['heldout_accuracy'] or 0:.3f}"
        )
    elif deployed:
        console.print(f"[yellow]no model was deployed:[/] {deployed.get('reason')}")


def _setup_logging(verbose: bool) -> None:
    """Services log INFO; `simulate` shows a progress bar and only warnings unless --verbose.

    --log-level / EDGEFED_LOG_LEVEL override both; the environment carries the
    choice into the processes Flower starts (ServerApp, ClientApps)."""
    from edgefed.common import logs

    level = os.environ.get(logs.LEVEL_ENV) or ("INFO" if verbose else "WARNING")
    os.environ[logs.LEVEL_ENV] = level
    logs.configure(level)


@app.callback()
def _options(
    log_level: Annotated[Optional[str], typer.Option(help="DEBUG, INFO, WARNING or ERROR (env EDGEFED_LOG_LEVEL).")] = None,
    log_json: Annotated[bool, typer.Option("--log-json", help="Log JSON lines (env EDGEFED_LOG_FORMAT=json).")] = False,
) -> None:
    from edgefed.common import logs

    if log_level:
        if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            _fail(f"--log-level must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
        os.environ[logs.LEVEL_ENV] = log_level.upper()
    if log_json:
        os.environ[logs.FORMAT_ENV] = "json"


def main() -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    app()


if __name__ == "__main__":
    main()
