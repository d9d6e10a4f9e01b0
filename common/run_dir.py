"""The run directory: `runs/<run-id>/` with config, metrics.jsonl, models and summary."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from edgefed.common.atomic import write_atomically, write_bytes_atomically
from edgefed.common.config import EdgefedConfig

ROUND_EVENT = "round"  # a metrics.jsonl line per round (sync) or global version (async)
DEPLOYED_EVENT = "deployed"  # a metrics.jsonl line per evaluation of a published model on devices


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


class RunDir:
    """Append-only metrics plus atomically written artefacts of one run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_config(cls, cfg: EdgefedConfig) -> RunDir:
        return cls(Path(cfg.out_dir) / (cfg.run_id or new_run_id()))

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_config(self, cfg: EdgefedConfig) -> None:
        self.write_json("config.json", cfg.to_run_config())

    def append_metrics(self, record: dict[str, Any], name: str = "metrics.jsonl") -> None:
        """One JSON object per line; flushed so a watcher (or a crash) sees whole lines."""
        with open(self.path / name, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()

    def read_metrics(self, name: str = "metrics.jsonl", event: str | None = ROUND_EVENT) -> list[dict[str, Any]]:
        """Whole lines only: a line still being written (no newline yet) is left for later.

        metrics.jsonl holds a line per round or version (`event` "round", the default here) and, in async mode,
        a line per deployed-model evaluation (`event` "deployed"); None reads every line (exports.jsonl has
        no events)."""
        path = self.path / name
        if not path.exists():
            return []
        text = path.read_text(encoding="utf-8")
        complete = text[: text.rfind("\n") + 1]
        lines = [json.loads(line) for line in complete.splitlines() if line.strip()]
        return lines if event is None else [r for r in lines if r.get("event", ROUND_EVENT) == event]

    def write_json(self, name: str, payload: dict[str, Any]) -> None:
        write_bytes_atomically(self.path / name, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())

    def read_json(self, name: str) -> dict[str, Any]:
        return json.loads((self.path / name).read_text())

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> Path:
        target = self.path / name
        contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
        write_atomically(target, lambda tmp: save_file(contiguous, str(tmp)))
        return target

    def load_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / name))
