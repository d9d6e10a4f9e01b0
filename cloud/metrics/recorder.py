"""Per-version metrics: evaluate each new global adapter centrally, append one JSON line.

The synchronous rounds and the asynchronous versions write the same base fields
(`round` is the round number, or the version in async mode); the async loop adds
its own (staleness histogram, buffer wait, clients in flight, ...).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch
from flwr.app import MetricRecord

from edgefed.common.config import EdgefedConfig
from edgefed.common.data.features import FeatureSet
from edgefed.common.evaluation import evaluate
from edgefed.common.model.lora import set_adapter_state
from edgefed.common.run_dir import DEPLOYED_EVENT, ROUND_EVENT, RunDir

log = logging.getLogger(__name__)


class RoundRecorder:
    """Evaluates each new global adapter centrally and appends its metrics line."""

    def __init__(self, cfg: EdgefedConfig, run: RunDir, model: torch.nn.Module, central: FeatureSet | None,
                 on_line: Callable[[dict], None] | None = None) -> None:
        """`on_line` sees each metrics line once it is written (the Prometheus exporter)."""
        self.cfg, self.run, self.model, self.central = cfg, run, model, central
        self.on_line = on_line
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def central_eval(self) -> tuple[float, float]:
        if self.central is None:
            return float("nan"), float("nan")
        result = evaluate(self.model, self.central, self.cfg.eval_batch_size)
        return result.accuracy, result.loss

    def record(
        self, server_round: int, adapter: dict[str, torch.Tensor], stats: dict, evaluate_now: bool = True,
        extra: dict | None = None, wall_s: float | None = None,
    ) -> MetricRecord:
        """Evaluate and append one line; `wall_s` is when the version was published (default: now)."""
        set_adapter_state(self.model, adapter)
        accuracy, loss = self.central_eval() if evaluate_now else (float("nan"), float("nan"))
        record = {
            "event": ROUND_EVENT,
            "round": server_round,
            "wall_s": round(self.elapsed() if wall_s is None else wall_s, 3),
            "accuracy": finite(accuracy),
            "loss": finite(loss),
            "federated_accuracy": finite(stats.get("federated_accuracy", float("nan"))),
            "train_loss": finite(stats.get("train_loss", float("nan"))),
            "bytes_sent": int(stats.get("bytes_sent", 0)),
            "bytes_received": int(stats.get("bytes_received", 0)),
            "clients": int(stats.get("clients", 0)),
            "failures": int(stats.get("failures", 0)),
            "rejected": dict(stats.get("rejected", {})),
            "update_norm": finite(stats.get("update_norm", float("nan"))),
            "version": int(stats.get("version", server_round)),
            **(extra or {}),
        }
        self.run.append_metrics(record)
        if self.on_line is not None:
            self.on_line(record)
        log.info("%s %d: central accuracy %.4f (loss %.4f), %d clients, %.1f s",
                 "version" if self.cfg.mode == "async" else "round", server_round, accuracy, loss,
                 record["clients"], record["wall_s"])
        return MetricRecord({"accuracy": accuracy, "loss": loss})


    def record_deployed(self, version: int, result: dict) -> None:
        """One `deployed` line: how published `version` scored on the devices that installed it."""
        accuracy = result.get("federated_accuracy")
        record = {"event": DEPLOYED_EVENT, "version": version, "wall_s": round(self.elapsed(), 3),
                  **{k: (finite(v) if isinstance(v, float) else v) for k, v in result.items()}}
        self.run.append_metrics(record)
        if self.on_line is not None:
            self.on_line(record)
        log.info("published v%d on %d of %d devices: federated accuracy %s", version,
                 int(result.get("devices_installed", 0)), int(result.get("devices", 0)),
                 "n/a" if accuracy is None else f"{accuracy:.4f}")


def finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), 6)
