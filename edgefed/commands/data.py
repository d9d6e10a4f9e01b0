"""`edgefed prepare` and `edgefed extract`: a data directory for a federation, keyframes and an index of videos."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from edgefed.commands.shared import console, fail, progress_bar, run_config
from edgefed.common.config import EdgefedConfig

if TYPE_CHECKING:
    from edgefed.simulations.prepare import PreparedData
    from edgefed.simulations.synthetic import SyntheticSpec

DEFAULT_CLIENTS = 4
DEFAULT_CLIPS = 400


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

    cfg = run_config(set_, seed=seed)
    data = prepare_with_progress(cfg, out.resolve(), clients, alpha, manifest, SyntheticSpec(num_clips=clips, seed=seed),
                                 client_features=inboxes is None)  # agents extract their inbox themselves
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


def prepare_with_progress(cfg: EdgefedConfig, data_dir: Path, clients: int, alpha: float, manifest: Optional[Path],
                          spec: SyntheticSpec, synthetic_dir: Optional[Path] = None,
                          client_features: bool = True) -> PreparedData:
    """Prepare a data directory (for `prepare` and `simulate`), a transient bar per stage."""
    from edgefed.simulations.prepare import PreparationError
    from edgefed.simulations.prepare import prepare as prepare_data

    with progress_bar(transient=True) as bar:
        tasks: dict[str, int] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        try:
            return prepare_data(data_dir, cfg, clients, alpha, manifest, spec, synthetic_dir, report, client_features)
        except (PreparationError, OSError, ValueError) as err:
            fail(str(err))


def extract(
    paths: Annotated[list[Path], typer.Argument(help="Video files or folders (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("extracted"),
    contact_sheet: Annotated[bool, typer.Option("--contact-sheet", help="Also write a PNG grid per video.")] = False,
    set_: Annotated[list[str], typer.Option("--set", help="Extractor setting key=value (run-config keys).")] = [],  # noqa: B006
) -> None:
    """Write keyframe JPEGs and a JSON index (shots, keyframes, audio windows, errors) per video."""
    from edgefed.edge.extract import extract_all, find_media

    cfg = run_config(set_)
    files = find_media(paths)
    if not files:
        fail("no media files found in " + ", ".join(map(str, paths)))
    with progress_bar() as bar:
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
        fail(f"every file failed ({len(outcomes)}); see the reasons above")
