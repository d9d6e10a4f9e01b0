"""The `edgefed` command line: the root app, its global options, and the commands of `edgefed.commands`.

The commands import what they need (Flower, Ray, onnxruntime, ...) when they run, so the CLI starts fast.
"""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from edgefed.commands import cloud, data, edge, inference, keys, simulation
from edgefed.commands.shared import fail

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated edge-cloud training for video and audio.")

for command in (data.prepare, simulation.simulate, simulation.report, data.extract, inference.infer, keys.certs):
    app.command()(command)
app.add_typer(cloud.cloud_app, name="cloud")
app.add_typer(edge.edge_app, name="edge")
app.add_typer(keys.keys_app, name="keys")


@app.callback()
def _options(
    log_level: Annotated[Optional[str], typer.Option(help="DEBUG, INFO, WARNING or ERROR (env EDGEFED_LOG_LEVEL).")] = None,
    log_json: Annotated[bool, typer.Option("--log-json", help="Log JSON lines (env EDGEFED_LOG_FORMAT=json).")] = False,
) -> None:
    from edgefed.common import logs

    if log_level:
        if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            fail(f"--log-level must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
        os.environ[logs.LEVEL_ENV] = log_level.upper()
    if log_json:
        os.environ[logs.FORMAT_ENV] = "json"


def main() -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    app()


if __name__ == "__main__":
    main()
