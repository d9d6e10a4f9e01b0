"""A Prometheus `/metrics` endpoint for one collector (the aggregator's, an edge agent's)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server


class MetricsEndpoint:
    """Base of a custom collector: `collect()` yields metric families; `serve(port)` exposes them over HTTP."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(self)
        self._server = None

    def collect(self):  # noqa: ANN201 - overridden; prometheus_client calls it at every scrape
        raise NotImplementedError

    def serve(self, port: int, address: str = "127.0.0.1"):  # noqa: ANN201 - returns self, for chaining
        """Loopback unless told otherwise: inside a container the scraper needs 0.0.0.0 (`metrics-bind`)."""
        self._server, _ = start_http_server(port, addr=address, registry=self.registry)
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
