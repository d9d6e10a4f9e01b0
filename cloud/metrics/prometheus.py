"""Prometheus metrics of the aggregator, from the same records metrics.jsonl gets.

    edgefed_version                          global version published last
    edgefed_versions_total                   versions published
    edgefed_updates_accepted_total           updates folded into versions
    edgefed_updates_rejected_total{reason}   updates refused, by reason
    edgefed_client_failures_total            instructions that errored or timed out
    edgefed_buffer_depth                     updates received and opened, waiting for the next version
    edgefed_clients_in_flight                instructions out
    edgefed_update_staleness{quantile}       staleness of accepted updates (summary)
    edgefed_aggregation_seconds              time to fold a version (summary: _count, _sum)
    edgefed_bytes_received_total / _sent_total
    edgefed_central_accuracy                 last central held-out accuracy
    edgefed_deployed_accuracy                last federated accuracy of the deployed INT8 model (async: per
                                             published version, on a sample of devices)
    edgefed_deployed_version                 the version it was measured on
    edgefed_model_exports_total{outcome}     published / refused exports
    edgefed_model_size_bytes, edgefed_model_version   the newest published model

Counters move only when a metrics.jsonl (or exports.jsonl) line is written,
under one lock, so a scrape always agrees with the files up to the version it
shows; a restarted ServerApp replays the files first, so the totals continue
instead of restarting at zero. The two live gauges are set by the async loop.

`edgefed cloud serve` serves them from its own process instead (`follow`): each
scrape first reads the whole lines the ServerApp appended since the last one,
and takes the live gauges from the state store, so the endpoint is there
before a run starts, while a killed ServerApp is resubmitted, and after the
run has ended.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily

from edgefed.cloud.state.store import StateStore, StateStoreError
from edgefed.common.metrics_endpoint import MetricsEndpoint
from edgefed.common.run_dir import DEPLOYED_EVENT, RunDir

log = logging.getLogger(__name__)

QUANTILES = (0.5, 0.9, 0.99)


class FederationMetrics(MetricsEndpoint):
    def __init__(self, federation: str) -> None:
        self.federation = federation
        self._lock = threading.Lock()
        self.version = 0
        self.versions = 0
        self.accepted = 0
        self.failures = 0
        self.rejected: Counter = Counter()
        self.staleness: Counter = Counter()
        self.aggregations = 0
        self.aggregation_s = 0.0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.accuracy = math.nan
        self.exports: Counter = Counter()
        self.model_size = 0
        self.model_version = 0
        self.buffer_depth = 0
        self.in_flight = 0
        self.deployed_accuracy = math.nan
        self.deployed_version = 0
        self._tails: list[_Tail] = []
        self._store: StateStore | None = None
        self._follow_lock = threading.Lock()
        super().__init__()  # registers self: every counter above must exist first

    # --- what the run records --------------------------------------------------------------
    def observe_version(self, record: dict) -> None:
        """One metrics.jsonl line (an async version or a sync round, or a deployed model's evaluation)."""
        if record.get("event") == DEPLOYED_EVENT:
            with self._lock:
                if record.get("federated_accuracy") is not None:
                    self.deployed_accuracy = float(record["federated_accuracy"])
                    self.deployed_version = int(record["version"])
            return
        with self._lock:
            self.version = int(record.get("version", self.version))
            self.versions += 1
            self.accepted += int(record.get("accepted", record.get("clients", 0)))
            self.failures += int(record.get("failures", 0))
            self.rejected.update({k: int(v) for k, v in (record.get("rejected") or {}).items()})
            self.staleness.update({int(k): int(v) for k, v in (record.get("staleness_histogram") or {}).items()})
            if record.get("aggregation_s") is not None:
                self.aggregations += 1
                self.aggregation_s += float(record["aggregation_s"])
            self.bytes_received += int(record.get("bytes_received", 0))
            self.bytes_sent += int(record.get("bytes_sent", 0))
            if record.get("accuracy") is not None:
                self.accuracy = float(record["accuracy"])

    def observe_export(self, outcome: dict) -> None:
        """One exports.jsonl line."""
        with self._lock:
            self.exports["published" if outcome.get("published") else "refused"] += 1
            if outcome.get("published"):
                self.model_size = int(outcome.get("size_bytes", 0))
                self.model_version = int(outcome["version"])

    def set_live(self, in_flight: int, buffer_depth: int) -> None:
        with self._lock:
            self.in_flight, self.buffer_depth = in_flight, buffer_depth

    def replay(self, run: RunDir) -> None:
        """A resumed federation: count what the run directory already holds."""
        for record in run.read_metrics(event=None):
            self.observe_version(record)
        for outcome in run.read_metrics("exports.jsonl", event=None):
            self.observe_export(outcome)

    def follow(self, run: RunDir, store: StateStore) -> FederationMetrics:
        """Count what another process (the ServerApp) writes into `run`, as of each scrape; live gauges from
        `store`. The files are append-only (RunDir.append_metrics)."""
        self._tails = [_Tail(run.path / "metrics.jsonl", self.observe_version),
                       _Tail(run.path / "exports.jsonl", self.observe_export)]
        self._store = store
        return self

    def close(self) -> None:
        super().close()
        if self._store is not None:
            self._store.close()

    def _catch_up(self) -> None:
        with self._follow_lock:  # scrapes may overlap: each line is counted once
            for tail in self._tails:
                tail.read()
            if self._store is None:
                return
            try:
                in_flight, depth = self._store.in_flight(), self._store.buffer_depth()
            except (StateStoreError, OSError) as err:
                log.warning("metrics: state store unreachable (%s); live gauges not updated", err)
                return
            self.set_live(in_flight or 0, depth)

    # --- Prometheus ---------------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        self._catch_up()
        with self._lock:  # one consistent snapshot per scrape
            labels = ["federation"]
            fed = [self.federation]

            def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
                family = GaugeMetricFamily(name, doc, labels=labels)
                family.add_metric(fed, value)
                return family

            def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
                family = CounterMetricFamily(name, doc, labels=labels)
                family.add_metric(fed, value)
                return family

            yield gauge("edgefed_version", "Global version published last.", self.version)
            yield counter("edgefed_versions", "Global versions (async) or rounds (sync) published.", self.versions)
            yield counter("edgefed_updates_accepted", "Client updates folded into versions.", self.accepted)
            rejected = CounterMetricFamily("edgefed_updates_rejected", "Client updates refused, by reason.",
                                           labels=[*labels, "reason"])
            for reason, count in sorted(self.rejected.items()):
                rejected.add_metric([*fed, reason], count)
            yield rejected
            yield counter("edgefed_client_failures", "Instructions that errored or timed out.", self.failures)
            yield gauge("edgefed_buffer_depth", "Updates received, waiting for the next version.", self.buffer_depth)
            yield gauge("edgefed_clients_in_flight", "Training instructions out.", self.in_flight)
            yield self._staleness_summary(labels, fed)
            aggregation = SummaryMetricFamily("edgefed_aggregation_seconds", "Seconds to fold a version.",
                                              labels=labels)
            aggregation.add_metric(fed, count_value=self.aggregations, sum_value=self.aggregation_s)
            yield aggregation
            yield counter("edgefed_bytes_received", "Encoded update bytes received.", self.bytes_received)
            yield counter("edgefed_bytes_sent", "Global adapter bytes sent.", self.bytes_sent)
            yield gauge("edgefed_central_accuracy", "Last central held-out accuracy.", self.accuracy)
            yield gauge("edgefed_deployed_accuracy", "Last federated accuracy of the deployed INT8 model.",
                        self.deployed_accuracy)
            yield gauge("edgefed_deployed_version", "Version the deployed accuracy was measured on.",
                        self.deployed_version)
            exports = CounterMetricFamily("edgefed_model_exports", "Model exports, by outcome.",
                                          labels=[*labels, "outcome"])
            for outcome in ("published", "refused"):
                exports.add_metric([*fed, outcome], self.exports[outcome])
            yield exports
            yield gauge("edgefed_model_size_bytes", "Size of the newest published model.", self.model_size)
            yield gauge("edgefed_model_version", "Version of the newest published model.", self.model_version)

    def _staleness_summary(self, labels: list[str], fed: list[str]) -> Metric:
        summary = Metric("edgefed_update_staleness", "Staleness (versions) of accepted updates.", "summary")
        total = sum(self.staleness.values())
        for q in QUANTILES:
            summary.add_sample("edgefed_update_staleness", {"federation": fed[0], "quantile": str(q)},
                               _quantile(self.staleness, q) if total else math.nan)
        summary.add_sample("edgefed_update_staleness_count", {"federation": fed[0]}, total)
        summary.add_sample("edgefed_update_staleness_sum", {"federation": fed[0]},
                           sum(k * v for k, v in self.staleness.items()))
        return summary


class _Tail:
    """The whole lines appended to a file since the last read (a line still being written waits)."""

    def __init__(self, path: Path, observe) -> None:  # observe: a bound observe_* method
        self.path, self.observe, self.offset = path, observe, 0

    def read(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.splitlines():
            if line.strip():
                try:
                    self.observe(json.loads(line))
                except (ValueError, KeyError, TypeError) as err:  # one bad line must not stop the endpoint
                    log.warning("%s: a line not counted (%s)", self.path, err)


def _quantile(counts: Counter, q: float) -> float:
    """Exact q-quantile of integer observations given as value -> count."""
    target = q * sum(counts.values())
    seen = 0
    for value in sorted(counts):
        seen += counts[value]
        if seen >= target:
            return float(value)
    return float(max(counts))
