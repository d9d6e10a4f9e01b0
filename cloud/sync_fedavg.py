"""Synchronous FedAvg: Flower's strategy, metered.

Flower's `FedAvg` does the sampling and the weighted average; this subclass
only counts what crosses the wire and keeps the clients' evaluation, so the
server app can write one metrics line per round.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.messages import ARRAYS


def message_bytes(msg: Message) -> int:
    """Bytes of the tensors a message carries (the payload that scales with the model)."""
    if msg.has_error() or ARRAYS not in msg.content:
        return 0
    return msg.content[ARRAYS].count_bytes()


class MeteredFedAvg(FedAvg):
    """FedAvg that records per-round traffic, participation and client evaluation."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.round_stats: dict[str, float] = {}
        self.reset_round()

    def reset_round(self) -> None:
        self.round_stats = {
            "bytes_sent": 0, "bytes_received": 0, "clients": 0, "failures": 0,
            "federated_accuracy": float("nan"), "train_loss": float("nan"),
        }

    def _count_out(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        self.round_stats["bytes_sent"] += sum(message_bytes(m) for m in messages)
        return messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._count_out(super().configure_train(server_round, arrays, config, grid))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._count_out(super().configure_evaluate(server_round, arrays, config, grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.round_stats["bytes_received"] += sum(message_bytes(m) for m in replies)
        self.round_stats["clients"] = sum(not m.has_error() for m in replies)
        self.round_stats["failures"] = sum(m.has_error() for m in replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if metrics is not None and "train-loss" in metrics:
            self.round_stats["train_loss"] = float(metrics["train-loss"])
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None and "eval-accuracy" in metrics:
            self.round_stats["federated_accuracy"] = float(metrics["eval-accuracy"])
        return metrics
