"""What every command uses: the console, `fail`, the run config from `--set`, the progress bar,
logging setup and the signal loop."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edgefed.common.config import ConfigError, EdgefedConfig

console = Console()


def fail(message: str) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


def run_config(overrides: list[str], **fields: object) -> EdgefedConfig:
    """The default run config with `--set key=value` overrides, then the fields a command's options set."""
    try:
        cfg = EdgefedConfig().with_overrides(overrides)
        return cfg.replace(**{k: v for k, v in fields.items() if v is not None})
    except ConfigError as err:
        fail(str(err))


def progress_bar(transient: bool = False) -> Progress:
    """The commands' progress bar (description, bar, done of total, time elapsed); use it in a `with`."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=transient)


def setup_logging(verbose: bool) -> None:
    """Services log INFO; `simulate` shows a progress bar and only warnings unless --verbose.

    --log-level / EDGEFED_LOG_LEVEL override both; the environment carries the
    choice into the processes Flower starts (ServerApp, ClientApps)."""
    from edgefed.common import logs

    level = os.environ.get(logs.LEVEL_ENV) or ("INFO" if verbose else "WARNING")
    os.environ[logs.LEVEL_ENV] = level
    logs.configure(level)


def until_signal(loop: Callable[[], None], stop: threading.Event, finish: Callable[[], None]) -> None:
    """Run `loop` (which returns once `stop` is set) until SIGTERM or SIGINT; `finish` in any case."""
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        loop()
    finally:
        finish()
