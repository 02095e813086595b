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
from typing import Any, Protocol, TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from numprotect.core.metrics.latency import LATENCY_BUCKETS, LatencyHistogram

__all__ = ["LATENCY_BUCKETS", "NAMESPACE", "UNOBSERVED", "Metrics", "Observer"]

# Every metric this project defines is named numprotect_<area>_<what>[_unit]; the gRPC server families keep the
# names of the Go and Java gRPC Prometheus interceptors (grpc_server_*), so existing dashboards fit.
NAMESPACE = "numprotect"

_Metric = TypeVar("_Metric", Counter, Gauge, Histogram)


class Observer(Protocol):
    """What takes one observation (a latency histogram's series)."""

    def observe(self, amount: float) -> None: ...


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
# What a client observes its round trips with when it was given no histogram.
UNOBSERVED: Observer = _NO_OP


class Metrics:
    """One process's registry and the factories of its metrics."""

    def __init__(self, service: str, *, enabled: bool = True) -> None:
        self.service = service
        self.enabled = enabled
        self.registry = CollectorRegistry(auto_describe=True)
        self._redis_round_trip: LatencyHistogram | None = None
        self._lock = threading.Lock()

    def redis_round_trip(self, client: str) -> Observer:
        """numprotect_redis_round_trip_seconds{client} for one Redis client kind ("mux", "redis-py", "fastredis"):
        the family is made once per process, each client kind gets its series (exposed from then on, at zero).
        A `latency.LatencyHistogram`: one observation is a bisect and one lock (on every Redis round trip)."""
        if not self.enabled:
            return _NO_OP
        with self._lock:
            if self._redis_round_trip is None:
                self._redis_round_trip = LatencyHistogram(
                    "numprotect_redis_round_trip_seconds",
                    "One Redis request and its reply (a pipeline or batch counts once), by client.",
                    "client",
                    self.registry,
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
