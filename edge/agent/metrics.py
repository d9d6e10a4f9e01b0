"""Prometheus metrics of an edge agent (agent config `metrics-port`; 0: off).

    edgefed_edge_inbox_backlog            labelled media not yet extracted
    edgefed_edge_clips_extracted_total    clips turned into cached features
    edgefed_edge_clips_failed_total       media that failed extraction
    edgefed_edge_model_version            the installed model's version (0: none)
    edgefed_edge_inference_latency_seconds  one clip through the installed model, measured on this device
    edgefed_edge_connected                1 while the SuperNode is connected to the SuperLink

Every value comes from the agent's status (what `agent.json` holds), read at
scrape time, so the endpoint and the file never disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from edgefed.common.metrics_endpoint import MetricsEndpoint


class AgentMetrics(MetricsEndpoint):
    def __init__(self, status: Callable[[], dict]) -> None:
        self.status = status
        super().__init__()

    def collect(self) -> Iterator[Metric]:
        s = self.status()
        device = [str(s["device_id"])]

        def family(kind: type, name: str, doc: str, value: float) -> Metric:
            metric = kind(name, doc, labels=["device"])
            metric.add_metric(device, value)
            return metric

        yield family(GaugeMetricFamily, "edgefed_edge_inbox_backlog", "Labelled media not yet extracted.",
                     s["inbox_backlog"])
        yield family(CounterMetricFamily, "edgefed_edge_clips_extracted", "Clips turned into cached features.",
                     s["clips_extracted"])
        yield family(CounterMetricFamily, "edgefed_edge_clips_failed", "Media that failed extraction.",
                     s["clips_failed"])
        yield family(GaugeMetricFamily, "edgefed_edge_model_version", "Installed model version (0: none).",
                     s["model_version"])
        latency = s.get("inference_latency_ms")
        yield family(GaugeMetricFamily, "edgefed_edge_inference_latency_seconds",
                     "One clip through the installed model on this device.",
                     float("nan") if latency is None else latency / 1e3)
        yield family(GaugeMetricFamily, "edgefed_edge_connected", "1 while connected to the SuperLink.",
                     1.0 if s["state"] == "connected" else 0.0)
