"""Prometheus endpoints: the aggregator's, scraped during a real simulated run, agrees with metrics.jsonl;
a resumed aggregator continues its totals; the edge agent's agrees with its agent.json."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from edgefed.cloud.metrics.prometheus import FederationMetrics
from edgefed.cloud.state.store import open_state_store
from edgefed.common.config import EdgefedConfig
from edgefed.common.run_dir import DEPLOYED_EVENT, RunDir
from edgefed.edge.agent.metrics import AgentMetrics
from edgefed.simulations.prepare import prepare
from edgefed.simulations.runner import run_federation
from edgefed.simulations.synthetic import SyntheticSpec
from tests.servers import free_port, scrape

RUNS = Path(__file__).parent / "data" / "runs"


def _sums(records: list[dict]) -> dict[str, float]:
    rejected = sum((Counter(r.get("rejected") or {}) for r in records), Counter())
    staleness = sum((Counter(r.get("staleness_histogram") or {}) for r in records), Counter())
    return {
        "accepted": sum(r.get("accepted", r.get("clients", 0)) for r in records),
        "bytes_received": sum(r["bytes_received"] for r in records),
        "bytes_sent": sum(r["bytes_sent"] for r in records),
        "rejected": sum(rejected.values()),
        "staleness_count": sum(staleness.values()),
        "staleness_sum": sum(int(k) * v for k, v in staleness.items()),
    }


def _agrees(sample: dict, records: list[dict]) -> None:
    expected = _sums(records)
    assert sample[("edgefed_updates_accepted_total", ())] == expected["accepted"]
    assert sample[("edgefed_bytes_received_total", ())] == expected["bytes_received"]
    assert sample[("edgefed_bytes_sent_total", ())] == expected["bytes_sent"]
    assert sum(v for (name, _), v in sample.items() if name == "edgefed_updates_rejected_total") == expected["rejected"]
    assert sample[("edgefed_update_staleness_count", ())] == expected["staleness_count"]
    assert sample[("edgefed_update_staleness_sum", ())] == expected["staleness_sum"]
    assert sample[("edgefed_version", ())] == (records[-1]["version"] if records else 0)


@pytest.mark.integration
def test_scraped_counters_agree_with_metrics_jsonl_during_a_run(tmp_path, monkeypatch):
    port = free_port()
    cfg = EdgefedConfig(out_dir=str(tmp_path / "runs"), run_id="scraped", max_versions=4, buffer_size=2, local_epochs=1,
                        min_clients=3, seed=3, export_every=2, parity_min_agreement=0.5, metrics_port=port)
    spec = SyntheticSpec(num_clips=36, width=96, height=72, fps=8, duration_s=2.0, shots=2, seed=3)
    data = prepare(tmp_path / "data", cfg, num_clients=3, alpha=1.0, synthetic=spec)
    scrapes: list[dict] = []
    stop = threading.Event()
    # Besides the poller's scrapes at whatever moments it gets, the endpoint is scraped on events: right after
    # each version is counted, and once more just before the ServerApp closes it (everything recorded by then).
    observe_version, close = FederationMetrics.observe_version, FederationMetrics.close
    closing: list[dict] = []

    def observe_then_scrape(self: FederationMetrics, record: dict) -> None:
        observe_version(self, record)
        if self._server is not None:  # not while replaying a run directory, before serving
            scrapes.append(scrape(port))

    def scrape_then_close(self: FederationMetrics) -> None:
        if self._server is not None:
            closing.append(scrape(port))
        close(self)

    monkeypatch.setattr(FederationMetrics, "observe_version", observe_then_scrape)
    monkeypatch.setattr(FederationMetrics, "close", scrape_then_close)

    def poll() -> None:
        while not stop.is_set():
            try:
                scrapes.append(scrape(port))
            except OSError:  # not up yet, or gone (URLError, a refused or reset connection, a timeout)
                pass
            time.sleep(0.25)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        run = run_federation(cfg.replace(data_dir=str(data.layout.root)), num_clients=3)
    finally:
        stop.set()
        poller.join(timeout=10)

    records, exports = run.read_metrics(), run.read_metrics("exports.jsonl")
    assert len(closing) == 1, "the endpoint was not closed by the run"
    scrapes.extend(closing)
    seen = [s for s in scrapes if s[("edgefed_versions_total", ())] > 0]
    assert seen, f"no scrape saw a version ({len(scrapes)} scrapes)"
    assert {int(s[("edgefed_versions_total", ())]) for s in seen} >= {1, 2, 3, 4}, "a version was never scraped"
    for sample in seen:  # every snapshot agrees with the lines written up to its version
        _agrees(sample, records[: int(sample[("edgefed_versions_total", ())])])
        assert 0 <= sample[("edgefed_clients_in_flight", ())] <= 3
    final = closing[0]  # the last one, taken when everything was recorded
    assert final[("edgefed_versions_total", ())] == len(records) == 4
    published = [e for e in exports if e["published"]]
    assert final[("edgefed_model_exports_total", (("outcome", "published"),))] == len(published)
    assert final[("edgefed_model_size_bytes", ())] == published[-1]["size_bytes"]
    assert final[("edgefed_aggregation_seconds_count", ())] == 4
    assert 0.0 <= final[("edgefed_central_accuracy", ())] <= 1.0


def test_a_resumed_aggregator_continues_its_totals_from_the_run_directory():
    run = RunDir(RUNS / "async-small")
    port = free_port()
    metrics = FederationMetrics("edgefed")
    metrics.replay(run)
    metrics.serve(port, "127.0.0.1")
    records = run.read_metrics()
    nxt = {**records[-1], "version": records[-1]["version"] + 1, "accepted": 3, "rejected": {"too-stale": 1},
           "staleness_histogram": {"4": 3}}
    try:
        sample = scrape(port)
        metrics.observe_version(nxt)  # the resumed aggregator's first new version adds to the totals, once
        after = scrape(port)
    finally:
        metrics.close()
    _agrees(sample, records)
    _agrees(after, [*records, nxt])
    assert after[("edgefed_versions_total", ())] == sample[("edgefed_versions_total", ())] + 1
    assert sample[("edgefed_model_exports_total", (("outcome", "published"),))] == sum(
        e["published"] for e in run.read_metrics("exports.jsonl"))


def test_edge_agent_metrics_report_its_status():
    status = {"device_id": "device-3", "state": "connected", "inbox_backlog": 7, "clips_extracted": 41,
              "clips_failed": 2, "model_version": 12, "inference_latency_ms": 8.5}
    port = free_port()
    metrics = AgentMetrics(lambda: status).serve(port, "127.0.0.1")
    try:
        sample = scrape(port)
        status["state"] = "rejoining"
        assert scrape(port)[("edgefed_edge_connected", ())] == 0.0  # read at scrape time
    finally:
        metrics.close()
    assert sample[("edgefed_edge_inbox_backlog", ())] == 7
    assert sample[("edgefed_edge_clips_extracted_total", ())] == 41
    assert sample[("edgefed_edge_clips_failed_total", ())] == 2
    assert sample[("edgefed_edge_model_version", ())] == 12
    assert sample[("edgefed_edge_inference_latency_seconds", ())] == pytest.approx(0.0085)
    assert sample[("edgefed_edge_connected", ())] == 1.0


def test_the_service_endpoint_follows_the_run_directory_and_outlives_the_run(tmp_path, redis_server):
    """`edgefed cloud serve` serves the metrics itself: what a ServerApp (here: its files and its store writes)
    recorded is scraped before, during and after the run, a half-written line only once it is whole."""
    source = RunDir(RUNS / "async-small")
    records, exports = source.read_metrics(), source.read_metrics("exports.jsonl")
    run = RunDir(tmp_path / "run")
    store = open_state_store(redis_server, "followed")
    port = free_port()
    metrics = FederationMetrics("followed").follow(run, open_state_store(redis_server, "followed"))
    metrics.serve(port, "127.0.0.1")
    try:
        before = scrape(port)  # the service is up before any ServerApp has written a line
        assert before[("edgefed_versions_total", ())] == 0 and before[("edgefed_clients_in_flight", ())] == 0
        half = len(records) // 2
        for record in records[:half]:
            run.append_metrics(record)
        with open(run.metrics_path, "a", encoding="utf-8") as fh:  # the next line, being written
            fh.write(json.dumps(records[half])[:20])
        store.note_in_flight(3)
        store.append_update(b"x", {"node-id": 1})
        during = scrape(port)
        _agrees(during, records[:half])
        assert during[("edgefed_clients_in_flight", ())] == 3 and during[("edgefed_buffer_depth", ())] == 1
        with open(run.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(records[half])[20:] + "\n")
        for record in records[half + 1:]:
            run.append_metrics(record)
        for outcome in exports:
            run.append_metrics(outcome, "exports.jsonl")
        run.append_metrics({"event": DEPLOYED_EVENT, "version": records[-1]["version"], "federated_accuracy": 0.75})
        after = scrape(port)  # the run is over: nothing else writes, the endpoint still answers
        again = scrape(port)
    finally:
        metrics.close()
        store.close()
    _agrees(after, records)
    assert after == again  # every line counted once, however often it is scraped
    assert after[("edgefed_model_exports_total", (("outcome", "published"),))] == sum(e["published"] for e in exports)
    assert after[("edgefed_deployed_accuracy", ())] == 0.75
    assert after[("edgefed_deployed_version", ())] == records[-1]["version"]
