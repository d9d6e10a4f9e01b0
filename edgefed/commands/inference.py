"""`edgefed infer`: the installed model's per-shot predictions on a device."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgefed.commands.shared import console, fail, run_config


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
        fail(str(err))
    if runtime.active is None:
        fail(f"{model_dir}: no verified model installed (a device installs pushed models; see README)")
    files = find_media(paths)
    if not files:
        fail("no media files found in " + ", ".join(map(str, paths)))
    # The device extracts exactly what the model was trained on: the signed manifest's feature config.
    cfg = run_config([], **runtime.active.manifest.feature_config)
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
