"""The standard gRPC server families, as one concern of the call layer (`numprotect.core.calls`).

Names and labels are those of the Go and Java gRPC Prometheus interceptors (go-grpc-prometheus), so existing
dashboards and alerts fit: grpc_server_started_total, grpc_server_handled_total (grpc_code as Go names it: OK,
NotFound, ...), grpc_server_msg_received_total, grpc_server_msg_sent_total and the grpc_server_handling_seconds
histogram, each by grpc_type, grpc_service and grpc_method.

Why not prometheus_client's Counter and Histogram children: each `inc` takes ~1 us there (a lock taken with `with`,
an "observable" check, the exemplar test) and a call would make five of them, on Translate's hot path. Here a
method's numbers are plain fields of one `_MethodStats` resolved once per method (`for_method`), updated under that
method's own lock, one acquisition when a call enters and one when it leaves (latency.Latencies);
`GrpcServerCollector` turns them into the families on a scrape. For a method that takes one request the messages
received are its calls started, and for a method that answers one response the messages sent are its calls handled
OK, so those cost nothing per call; streams count each message through the layer's `received`/`sent` hooks.

Calls the admission layer refuses before any concern runs (load shedding) are not in these families: they are
numprotect_calls_shed_total{reason}.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from numprotect.core.calls import GRPC_TYPES, Method
from numprotect.core.metrics import Metrics
from numprotect.core.metrics.latency import LATENCY_BUCKETS, Latencies

LABELS = ("grpc_type", "grpc_service", "grpc_method")
CLIENT_STREAMS = frozenset(("client_stream", "bidi_stream"))
SERVER_STREAMS = frozenset(("server_stream", "bidi_stream"))


def _go_name(code: grpc.StatusCode) -> str:
    """INVALID_ARGUMENT -> InvalidArgument, as Go's codes.Code.String(); CANCELLED is spelled Canceled there."""
    if code is grpc.StatusCode.OK:
        return "OK"
    if code is grpc.StatusCode.CANCELLED:
        return "Canceled"
    return "".join(word.capitalize() for word in code.name.split("_"))


# What the servicer context's code() returns at leave, to the label: None (nothing set: OK), a grpc.StatusCode (the
# thread-pool server) or its number (grpc.aio after an abort).
CODE_NAMES: dict[object, str] = {None: "OK"}
for _code in grpc.StatusCode:
    CODE_NAMES[_code] = CODE_NAMES[_code.value[0]] = _go_name(_code)


class _MethodStats(Latencies):
    """One method's numbers: its handling-time histogram and counts; every field is changed under `lock`."""

    __slots__ = ("handled", "labels", "received", "sent", "started")

    def __init__(self, labels: tuple[str, str, str]) -> None:
        super().__init__()
        self.labels = labels
        self.started = 0
        self.received = 0  # streams from the client only (otherwise: started)
        self.sent = 0  # streams to the client only (otherwise: handled OK)
        self.handled: dict[str, int] = {"OK": 0}


class _MethodMetrics:
    """The concern bound to one method: started on enter; handled by code and the handling time on leave."""

    __slots__ = ("_stats", "received", "sent")

    def __init__(self, stats: _MethodStats, client_streams: bool, server_streams: bool) -> None:
        self._stats = stats
        # The call layer runs these before each message of a stream (calls.py, "message hooks").
        self.received = self._received if client_streams else None
        self.sent = self._sent if server_streams else None

    # acquire/release rather than `with`: a third of the cost on CPython 3.11; nothing between them can raise.
    def enter(self, context: Any, request: Any = None) -> float:
        stats = self._stats
        lock = stats.lock
        lock.acquire()
        stats.started += 1
        lock.release()
        return time.perf_counter()

    def leave(self, state: object, context: Any) -> None:
        elapsed = time.perf_counter() - state  # type: ignore[operator]
        code = CODE_NAMES.get(context.code(), "Unknown")
        index = bisect.bisect_left(LATENCY_BUCKETS, elapsed)
        stats = self._stats
        handled = stats.handled
        lock = stats.lock
        lock.acquire()
        handled[code] = handled.get(code, 0) + 1
        stats.buckets[index] += 1
        stats.sum += elapsed
        lock.release()

    def _received(self) -> None:
        stats = self._stats
        lock = stats.lock
        lock.acquire()
        stats.received += 1
        lock.release()

    def _sent(self) -> None:
        stats = self._stats
        lock = stats.lock
        lock.acquire()
        stats.sent += 1
        lock.release()


class GrpcServerMetrics:
    """The gRPC server families of one process: a `CallConcern` (server.call_concerns) and their collector."""

    def __init__(self, metrics: Metrics) -> None:
        self._methods: dict[str, tuple[_MethodStats, str]] = {}
        self._lock = threading.Lock()
        metrics.registry.register(GrpcServerCollector(self))

    def for_method(self, method: Method) -> _MethodMetrics:
        stats, grpc_type = self._stats(method.service, method.name, method.grpc_type)
        return _MethodMetrics(stats, grpc_type in CLIENT_STREAMS, grpc_type in SERVER_STREAMS)

    def preinitialise(self, service_names: Iterable[str]) -> None:
        """Every method of these services (full names, as registered) at zero, with code OK: a fresh process
        exposes started and handled for each, as go-grpc-prometheus's InitializeMetrics does."""
        pool = descriptor_pool.Default()
        for full_name in service_names:
            try:
                service = pool.FindServiceByName(full_name)
            except KeyError:  # no generated descriptor (a hand-made handler): its methods appear on first call
                continue
            for method in service.methods:
                self._stats(full_name, method.name, _grpc_type(method.client_streaming, method.server_streaming))

    def _stats(self, service: str, name: str, grpc_type: str) -> tuple[_MethodStats, str]:
        key = f"/{service}/{name}"
        with self._lock:
            found = self._methods.get(key)
            if found is None:
                found = (_MethodStats((grpc_type, service, name)), grpc_type)
                self._methods[key] = found
            return found

    def snapshot(self) -> list[tuple[_MethodStats, str]]:
        with self._lock:
            return list(self._methods.values())


def _grpc_type(client_streaming: bool, server_streaming: bool) -> str:
    return GRPC_TYPES[(client_streaming, server_streaming)]


class GrpcServerCollector(Collector):
    """The families from the per-method numbers, read under each method's lock."""

    def __init__(self, source: GrpcServerMetrics) -> None:
        self._source = source

    def collect(self) -> Iterator[Any]:
        started = CounterMetricFamily("grpc_server_started", "RPCs started on the server.", labels=LABELS)
        handled = CounterMetricFamily(
            "grpc_server_handled",
            "RPCs completed on the server, regardless of success or failure.",
            labels=(*LABELS, "grpc_code"),
        )
        received = CounterMetricFamily(
            "grpc_server_msg_received", "RPC stream messages received on the server.", labels=LABELS
        )
        sent = CounterMetricFamily("grpc_server_msg_sent", "gRPC stream messages sent on the server.", labels=LABELS)
        seconds = HistogramMetricFamily(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
            labels=LABELS,
        )
        for stats, grpc_type in self._source.snapshot():
            with stats.lock:
                calls, messages_in, messages_out = stats.started, stats.received, stats.sent
                by_code = dict(stats.handled)
                buckets, total = stats.cumulative()
            labels = list(stats.labels)
            started.add_metric(labels, calls)
            for code, count in by_code.items():
                handled.add_metric([*labels, code], count)
            received.add_metric(labels, messages_in if grpc_type in CLIENT_STREAMS else calls)
            sent.add_metric(labels, messages_out if grpc_type in SERVER_STREAMS else by_code.get("OK", 0))
            seconds.add_metric(labels, buckets, total)
        yield from (started, handled, received, sent, seconds)

    def describe(self) -> Iterator[Any]:
        return iter(())
