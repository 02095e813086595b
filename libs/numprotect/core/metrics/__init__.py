"""Prometheus metrics of one service process (docs/operations.md, "Metrics").

Each process owns one `Metrics`, made at start-up and handed to builders through the runtime (`runtime.metrics`):
its own `CollectorRegistry`, never prometheus_client's global one, so tests run several services in one
interpreter and see only their own series. Domain code receives the metric objects it updates through its
constructor, made with `counter`, `gauge` and `histogram` here.

With metrics off (`enabled=False`) the same factories hand out no-op objects: the call sites stay unconditional and
cost a method call that does nothing, so "metrics off" in the benchmark is a true baseline.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Every metric this project defines is named numprotect_<area>_<what>[_unit]; the gRPC server families keep the
# names of the Go and Java gRPC Prometheus interceptors (grpc_server_*), so existing dashboards fit.
NAMESPACE = "numprotect"

_Metric = TypeVar("_Metric", Counter, Gauge, Histogram)

# Latency buckets (seconds) of the gRPC handling time and the Redis round trip: 50 us .. 10 s.
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class _NoOp:
    """Stands in for a Counter, Gauge or Histogram (and their labelled children) when metrics are off."""

    __slots__ = ()

    def labels(self, *args: Any, **kwargs: Any) -> _NoOp:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, amount: float, exemplar: Any = None) -> None:
        pass

    def set_function(self, function: Any) -> None:
        pass


_NO_OP = _NoOp()


class Metrics:
    """One process's registry and the factories of its metrics."""

    def __init__(self, service: str, *, enabled: bool = True) -> None:
        self.service = service
        self.enabled = enabled
        self.registry = CollectorRegistry(auto_describe=True)
        self._redis_round_trip: Histogram | None = None
        self._lock = threading.Lock()

    def redis_round_trip(self, client: str) -> Histogram:
        """numprotect_redis_round_trip_seconds{client} for one Redis client kind ("mux", "redis-py", "fastredis"):
        the family is made once per process, each client kind gets its labelled child (its series exists from then
        on, at zero)."""
        with self._lock:
            if self._redis_round_trip is None:
                self._redis_round_trip = self.histogram(
                    "numprotect_redis_round_trip_seconds",
                    "One Redis request and its reply (a pipeline or batch counts once), by client.",
                    ("client",),
                    buckets=LATENCY_BUCKETS,
                )
            return self._redis_round_trip.labels(client)

    def counter(self, name: str, documentation: str, labelnames: Iterable[str] = ()) -> Counter:
        return self._made(Counter, name, documentation, labelnames)

    def gauge(self, name: str, documentation: str, labelnames: Iterable[str] = ()) -> Gauge:
        return self._made(Gauge, name, documentation, labelnames)

    def histogram(
        self, name: str, documentation: str, labelnames: Iterable[str] = (), *, buckets: Sequence[float]
    ) -> Histogram:
        if not self.enabled:
            return cast(Histogram, _NO_OP)
        return Histogram(name, documentation, labelnames, registry=self.registry, buckets=buckets)

    def _made(self, kind: type[_Metric], name: str, documentation: str, labelnames: Iterable[str]) -> _Metric:
        if not self.enabled:
            return cast(_Metric, _NO_OP)
        return kind(name, documentation, labelnames, registry=self.registry)
