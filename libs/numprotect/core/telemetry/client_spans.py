"""CLIENT spans and trace context on calls to peers (binding -> allocation), without grpc.aio client interceptors.

grpc.aio runs a call through any client interceptor with its intercepted-call machinery (a task and futures of its
own per call), and opentelemetry-instrumentation-grpc's interceptor starts an SDK span for every call, sampled or
not, and awaits the call's status inside the interceptor: ~37 and ~12 us of client CPU per call here, 4 % of the
binding server's main thread during creates (docs/benchmarks/2026-11-30-aio-call-layer.md). `TracedChannel` wraps
the channel's multicallables instead:
- outside a recording span (an unsampled call: nearly all of them) a call only carries the W3C `traceparent` (and
  `tracestate`) of the current span, so the peer follows the caller's sampling decision; no span is made;
- inside a recording span it gets a CLIENT span named by the method, as the instrumentation made it (rpc.system,
  rpc.service, rpc.method, rpc.grpc.status_code; ERROR with the status details, phone numbers masked, when not OK),
  child of the current span and parent of the peer's SERVER span, ended when the call is done;
- health and reflection calls are neither traced nor given trace context.
Metadata is taken as the `metadata=` keyword only (how stubs and our clients pass it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from numprotect.core.calls import UNWRAPPED_SERVICES
from numprotect.core.telemetry.attributes import mask_numbers, safe_attributes

_PROPAGATOR = TraceContextTextMapPropagator()


def _with_trace_context(metadata: Any, context: Any = None) -> Any:
    """`metadata` plus the traceparent (and tracestate) of the span current in `context` (default: now); unchanged
    when there is no valid span."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context)
    if not carrier:
        return metadata
    return (*(metadata or ()), *carrier.items())


class _TracedMultiCallable:
    """A multicallable of any kind whose calls carry trace context, and a CLIENT span when the caller records."""

    __slots__ = ("_attributes", "_call", "_finishing", "_method", "_tracer")

    def __init__(
        self, call: Callable[..., Any], method: str, tracer: trace.Tracer, finishing: set[asyncio.Task[None]]
    ) -> None:
        self._call = call
        self._method = method
        service, _, name = method.lstrip("/").partition("/")
        self._attributes = safe_attributes({"rpc.system": "grpc", "rpc.service": service, "rpc.method": name})
        self._tracer = tracer
        self._finishing = finishing

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        current = trace.get_current_span()
        if not current.is_recording():
            kwargs["metadata"] = _with_trace_context(kwargs.get("metadata"))
            return self._call(*args, **kwargs)
        span = self._tracer.start_span(self._method, kind=SpanKind.CLIENT, attributes=self._attributes)
        kwargs["metadata"] = _with_trace_context(kwargs.get("metadata"), trace.set_span_in_context(span))
        try:
            call = self._call(*args, **kwargs)
        except BaseException as exc:
            span.set_status(Status(StatusCode.ERROR, mask_numbers(f"{type(exc).__name__}: {exc}")))
            span.end()
            raise
        finishing = asyncio.ensure_future(_finish(span, call))
        self._finishing.add(finishing)  # held until done (the loop keeps only a weak reference)
        finishing.add_done_callback(self._finishing.discard)
        return call


async def _finish(span: Span, call: Any) -> None:
    """Ends a call's CLIENT span with its status once it is done (a recorded call only: one task per call)."""
    try:
        code: grpc.StatusCode = await call.code()
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code != grpc.StatusCode.OK:
            details = await call.details()
            span.set_status(Status(StatusCode.ERROR, mask_numbers(f"{code.name}: {details or ''}")))
    finally:
        span.end()


class TracedChannel(grpc.aio.Channel):
    """A grpc.aio channel whose calls carry trace context and, inside recording spans, CLIENT spans (see module)."""

    def __init__(self, channel: grpc.aio.Channel, tracer: trace.Tracer) -> None:
        self.channel = channel
        self._tracer = tracer
        self._finishing: set[asyncio.Task[None]] = set()

    def _traced(self, call: Any, method: str | bytes) -> Any:
        name = method.decode("ascii", "replace") if isinstance(method, bytes) else method
        if name.lstrip("/").startswith(UNWRAPPED_SERVICES):
            return call
        return _TracedMultiCallable(call, name, self._tracer, self._finishing)

    def unary_unary(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None, **options: Any
    ) -> Any:
        return self._traced(
            self.channel.unary_unary(method, request_serializer, response_deserializer, **options), method
        )

    def unary_stream(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None, **options: Any
    ) -> Any:
        return self._traced(
            self.channel.unary_stream(method, request_serializer, response_deserializer, **options), method
        )

    def stream_unary(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None, **options: Any
    ) -> Any:
        return self._traced(
            self.channel.stream_unary(method, request_serializer, response_deserializer, **options), method
        )

    def stream_stream(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None, **options: Any
    ) -> Any:
        return self._traced(
            self.channel.stream_stream(method, request_serializer, response_deserializer, **options), method
        )

    async def close(self, grace: float | None = None) -> None:
        await self.channel.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self.channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self.channel.channel_ready()

    async def __aenter__(self) -> TracedChannel:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc_val: BaseException | None, exc_tb: TracebackType | None
    ) -> None:
        await self.close(None)
