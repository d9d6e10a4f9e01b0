"""`edgefed simulate` (a local federation end to end, its results table) and `edgefed report`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from edgefed.commands.data import DEFAULT_CLIENTS, DEFAULT_CLIPS, prepare_with_progress
from edgefed.commands.shared import console, fail, progress_bar, run_config, setup_logging


def simulate(
    clients: Annotated[int, typer.Option(help="Simulated devices (Flower SuperNodes).")] = DEFAULT_CLIENTS,
    mode: Annotated[Optional[str], typer.Option(help="async (FedBuff, the default) or sync (FedAvg rounds).")] = None,
    versions: Annotated[Optional[int], typer.Option(help="Async: global versions to publish (default: max-versions).")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="Sync: federated rounds (default: num-rounds).")] = None,
    profile: Annotated[Optional[str], typer.Option(help="Device profile: uniform, mobile-skewed, memory-tiers, flaky.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for data, partitioning and training.")] = 0,
    out: Annotated[Path, typer.Option("--out", help="Folder for run directories.")] = Path("runs"),
    alpha: Annotated[float, typer.Option(help="Dirichlet label-skew alpha (small = more skew).")] = 1.0,
    manifest: Annotated[Optional[Path], typer.Option(help="Your metadata.jsonl; default: synthetic clips.")] = None,
    clips: Annotated[int, typer.Option(help="Synthetic clips to generate.")] = DEFAULT_CLIPS,
    run_id: Annotated[Optional[str], typer.Option(help="Run directory name (default: timestamped).")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Run-config override key=value (repeatable).")] = [],  # noqa: B006
    verbose: Annotated[bool, typer.Option(help="Show Flower's and Ray's logs.")] = False,
    ray_address: Annotated[Optional[str], typer.Option(help="Run the clients on this Ray cluster (its head's "
                                                            "host:port) instead of a local one.")] = None,
    client_cpus: Annotated[Optional[float], typer.Option(help="CPUs each ClientApp actor takes (default: the "
                                                              "machine's cores shared; 1 on a Ray cluster).")] = None,
    client_gpus: Annotated[float, typer.Option(help="GPUs each ClientApp actor takes.")] = 0.0,
) -> None:
    """Run a local multi-client federation end to end and print accuracy per version (or round)."""
    from edgefed.common.run_dir import new_run_id
    from edgefed.simulations.runner import run_federation
    from edgefed.simulations.synthetic import SyntheticSpec

    setup_logging(verbose)
    rid = run_id or new_run_id()
    cfg = run_config(set_, seed=seed, mode=mode, max_versions=versions, num_rounds=rounds, device_profile=profile,
                     out_dir=str(out), run_id=rid, min_clients=clients)
    run_path = out / rid
    spec = SyntheticSpec(num_clips=clips, seed=seed)
    data = prepare_with_progress(cfg, (run_path / "data").resolve(), clients, alpha, manifest, spec,
                                 synthetic_dir=(out / "datasets" / f"synthetic-n{clips}-s{seed}").resolve())
    cfg = cfg.replace(data_dir=str(data.layout.root))
    unit, steps = ("version", cfg.max_versions) if cfg.mode == "async" else ("round", cfg.num_rounds)
    console.print(f"[bold]edgefed simulate[/] run {rid}: {clients} clients, {cfg.mode} mode, {steps} {unit}s, "
                  f"devices {cfg.device_profile}, {data.clips} clips (label skew {data.label_skew:.2f})")

    start = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task(f"{unit}s", total=steps)

        def on_round(record: dict) -> None:
            acc = record.get("accuracy")
            bar.update(task, completed=record["round"],
                       description=f"{unit} {record['round']}: accuracy {'-' if acc is None else f'{acc:.3f}'}")

        try:
            run = run_federation(cfg, clients, on_round=on_round, verbose=verbose, ray_address=ray_address,
                                 client_cpus=client_cpus, client_gpus=client_gpus)
        except RuntimeError as err:
            fail(str(err))
    print_results(run.path, time.perf_counter() - start)
    from edgefed.cloud.reports.report import build_report

    console.print(f"report: {build_report([run.path]).resolve()} (open it in a browser)")


def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories; several are overlaid, labelled by how their configs differ.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Where to write (default: report.html in the first run directory).")] = None,
) -> None:
    """Write a self-contained report.html: accuracy, bytes, staleness, participation, rejections, models, config."""
    from edgefed.cloud.reports.report import ReportError, build_report

    try:
        path = build_report(run_dirs, out)
    except ReportError as err:
        fail(str(err))
    console.print(f"wrote {path.resolve()}")


def print_results(run_path: Path, wall_s: float) -> None:
    """The per-version (or per-round) table of a finished run, its summary and the deployed model."""
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
