"""The ``/metrics`` endpoint that master and worker both serve."""

from __future__ import annotations

import logging
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger("taskfleet.metrics")


class MetricsEndpoint:
    """Prometheus text for one registry over HTTP at HOST:PORT, on a daemon thread."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._server: WSGIServer | None = None

    def serve(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self._server, _thread = start_http_server(
            int(port), addr=host.strip("[]"), registry=self.registry
        )
        log.info("metrics at http://%s/metrics", address)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
