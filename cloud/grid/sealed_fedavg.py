"""Synchronous FedAvg over compressed, sealed updates.

Flower's `FedAvg` samples the nodes and runs the rounds; this subclass changes
what travels: the global adapter goes out encoded with the downlink codec,
and each reply's update is verified, opened, decoded and sanity-checked by the
`UpdateOpener` before its delta joins the example-weighted average. Refused
updates are counted by reason and the round goes on without them. It also
counts the bytes both ways and keeps the clients' evaluation, so the server
app can write one metrics line per round.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from edgefed.cloud.aggregation.lora_aggregation import WeightedDelta, aggregate
from edgefed.cloud.aggregation.update_opener import RejectedUpdate, UpdateOpener, plain_context
from edgefed.cloud.aggregation.version_window import IssuedVersions
from edgefed.common.config import LoraAggregationMode
from edgefed.common.wire.codec import Adapter, encode
from edgefed.common.wire.messages import (
    CONFIG,
    GLOBAL_ADAPTER,
    GLOBAL_VERSION,
    METRICS,
    PAYLOAD,
    UPDATE,
    adapter_to_record,
    plain_meta,
    record_to_adapter,
)

log = logging.getLogger(__name__)


class SealedFedAvg(FedAvg):
    """FedAvg whose global adapter and updates travel as codec bytes (sealed by default)."""

    def __init__(self, opener: UpdateOpener, versions: IssuedVersions, downlink_codec: str,
                 lora_aggregation: LoraAggregationMode = "fedavg", **kwargs: object) -> None:
        """`opener` accepts updates based on the `versions` this strategy issues (it records each one sent)."""
        super().__init__(**kwargs)
        self.opener = opener
        self.versions = versions
        self.downlink_codec = downlink_codec
        self.lora_aggregation = lora_aggregation
        self.version = 0  # the global version clients are training on
        self._global: Adapter = OrderedDict()
        self._encoded: tuple[int, bytes] | None = None
        self.round_stats: dict = {}
        self.reset_round()

    def reset_round(self) -> None:
        self.round_stats = {
            "bytes_sent": 0, "bytes_received": 0, "clients": 0, "failures": 0, "rejected": Counter(),
            "federated_accuracy": float("nan"), "train_loss": float("nan"), "update_norm": float("nan"),
            "devices": [], "bytes_up_by_device": Counter(),
        }

    # --- downlink ----------------------------------------------------------
    def _instructions(self, messages: Iterable[Message], arrays: ArrayRecord) -> list[Message]:
        """Re-address Flower's sampled messages with the encoded global adapter in place of raw arrays."""
        out = []
        for template in messages:
            config = ConfigRecord(dict(template.content[CONFIG]))
            config[GLOBAL_ADAPTER] = self._encode(arrays)
            config[GLOBAL_VERSION] = self.version
            msg = Message(content=RecordDict({CONFIG: config}), message_type=template.metadata.message_type,
                          dst_node_id=template.metadata.dst_node_id)
            self.round_stats["bytes_sent"] += len(config[GLOBAL_ADAPTER])
            out.append(msg)
        return out

    def _encode(self, arrays: ArrayRecord) -> bytes:
        if self._encoded is None or self._encoded[0] != self.version:
            self._global = record_to_adapter(arrays)
            self._encoded = (self.version, encode(self._global, self.downlink_codec))
            self.versions.issue(self.version)
        return self._encoded[1]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._instructions(super().configure_train(server_round, arrays, config, grid), arrays)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._instructions(super().configure_evaluate(server_round, arrays, config, grid), arrays)

    # --- uplink ------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted: list[tuple[Adapter, float]] = []
        metrics: list[RecordDict] = []
        norms = []
        for reply in replies:
            if reply.has_error():
                self.round_stats["failures"] += 1
                log.warning("node %s failed: %s", reply.metadata.src_node_id, reply.error.reason)
                continue
            try:
                opened = self._open(reply)
            except RejectedUpdate as rejected:
                self.round_stats["rejected"][rejected.reason] += 1
                log.warning("rejected update from %s: %s", rejected.node, rejected)
                continue
            accepted.append((opened.delta, opened.context.num_examples))  # the weight the device signed
            self.round_stats["devices"].append(opened.context.node)
            self.round_stats["bytes_up_by_device"][opened.context.node] += len(bytes(reply.content[UPDATE][PAYLOAD]))
            metrics.append(RecordDict({METRICS: reply.content[METRICS]}))
            norms.append(opened.norm)
        self.round_stats["clients"] = len(accepted)
        if not accepted:
            log.warning("round %d: no update accepted; the global adapter stays at version %d", server_round, self.version)
            return None, None
        total = sum(w for _, w in accepted)
        step = aggregate(self._global, [WeightedDelta(delta, w / total, self._global) for delta, w in accepted],
                         self.lora_aggregation)
        new_global = OrderedDict((name, value + step[name]) for name, value in self._global.items())
        if not all(torch.isfinite(t).all() for t in new_global.values()):
            # each accepted update was finite and bounded: a non-finite average is never published
            self.round_stats["rejected"]["non-finite-aggregate"] += len(accepted)
            log.error("round %d: the aggregate is not finite; the global adapter stays at version %d",
                      server_round, self.version)
            return None, None
        self.version += 1
        aggregated = self.train_metrics_aggr_fn(metrics, self.weighted_by_key)
        if "train-loss" in aggregated:
            self.round_stats["train_loss"] = float(aggregated["train-loss"])
        self.round_stats["update_norm"] = sum(norms) / len(norms)
        return adapter_to_record(new_global), aggregated

    def _open(self, reply: Message) -> object:
        if UPDATE not in reply.content:
            raise RejectedUpdate("malformed", "reply carries no update record", str(reply.metadata.src_node_id))
        update = reply.content[UPDATE]
        payload = bytes(update.get(PAYLOAD, b""))
        self.round_stats["bytes_received"] += len(payload)
        return self.opener.open(payload, self._global, plain_context(plain_meta(update)))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None and "eval-accuracy" in metrics:
            self.round_stats["federated_accuracy"] = float(metrics["eval-accuracy"])
        return metrics
