"""Logging for every edgefed process: one logger per module, one handler at the root.

Library code only calls `logging.getLogger(__name__)`; entry points call
`configure()` once. `EDGEFED_LOG_LEVEL` (DEBUG, INFO, ...) and
`EDGEFED_LOG_FORMAT=json` apply to every process of a run: the CLI, and the
ServerApp and ClientApp processes Flower starts, which inherit the
environment. JSON lines carry time, level, logger, message and, for errors,
the traceback; they are what a log shipper wants.
"""

from __future__ import annotations

import json
import logging
import os
import time

LEVEL_ENV = "EDGEFED_LOG_LEVEL"
FORMAT_ENV = "EDGEFED_LOG_FORMAT"
_HANDLER_NAME = "edgefed"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(level: str | int | None = None, json_format: bool | None = None) -> None:
    """Install the root handler (idempotent); arguments override the environment."""
    level = level or os.environ.get(LEVEL_ENV, "INFO")
    if json_format is None:
        json_format = os.environ.get(FORMAT_ENV, "").lower() == "json"
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if json_format else logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(level if isinstance(level, int) else level.upper())
    root.addHandler(handler)
    root.setLevel(handler.level)
    # Flower logs through its own handler; ours would print its lines twice.
    logging.getLogger("flwr").propagate = False


def configure_from_env() -> None:
    """In processes Flower starts (ServerApp, ClientApp): follow the environment if it says anything."""
    if os.environ.get(LEVEL_ENV) or os.environ.get(FORMAT_ENV):
        configure()
