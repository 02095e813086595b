"""Serving one process's registry: Prometheus text at http://<host>:<port>/metrics (docs/operations.md "Metrics").

prometheus_client's own HTTP server (a thread, plaintext) serves the process's registry, never the global one. The
port is NUMPROTECT_METRICS_PORT (0: one the OS chooses, logged in the "serving" line), the address
NUMPROTECT_METRICS_HOST (default the gRPC host). Besides the service's own metrics the registry carries what every
process exposes: prometheus_client's process, platform and gc collectors and numprotect_build_info.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import GCCollector, PlatformCollector, ProcessCollector, start_http_server

from numprotect.core.metrics import Metrics
from numprotect.core.settings import SettingsError

log = logging.getLogger(__name__)

# How long `stop` waits for the HTTP server's loop (it polls every 0.5 s) and a scrape in progress.
STOP_WAIT_SECONDS = 2.0


def version() -> str:
    try:
        return importlib.metadata.version("numprotect")
    except importlib.metadata.PackageNotFoundError:  # run from a tree that was never installed
        return "unknown"


def register_process_metrics(metrics: Metrics) -> None:
    """process_* (CPU, memory, open files), python_info, python_gc_* and numprotect_build_info{service, version} = 1
    on the process's registry (nothing when metrics are off)."""
    if not metrics.enabled:
        return
    ProcessCollector(registry=metrics.registry)
    PlatformCollector(registry=metrics.registry)
    GCCollector(registry=metrics.registry)
    build = metrics.gauge("numprotect_build_info", "The running build: always 1.", ("service", "version"))
    build.labels(metrics.service, version()).set(1)


class MetricsEndpoint:
    """The HTTP server of /metrics: `start` binds (a port that cannot be bound is a SettingsError naming the
    variable), `stop` ends it within STOP_WAIT_SECONDS."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self._metrics = metrics
        self.host = host
        self.port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> int:
        try:
            self._server, self._thread = start_http_server(self.port, addr=self.host, registry=self._metrics.registry)
        except OSError as exc:
            raise SettingsError(
                f"NUMPROTECT_METRICS_PORT: cannot listen on {self.host}:{self.port} ({exc.strerror or exc})"
            ) from None
        self.port = int(self._server.server_port)
        return self.port

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._server = self._thread = None
        # shutdown() waits for serve_forever without a timeout: asked from a helper thread and waited for, bounded.
        stopper = threading.Thread(target=server.shutdown, name="metrics-stop", daemon=True)
        stopper.start()
        stopper.join(STOP_WAIT_SECONDS)
        thread.join(STOP_WAIT_SECONDS)
        if thread.is_alive():
            log.warning("metrics HTTP server still running at shutdown; not waiting for it")
        server.server_close()
