"""SERVER spans: one per call (health and reflection excepted), the sampling decision made without the SDK."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from numprotect.core.interceptors import Behavior, WrappedHandlers, rewrap
from numprotect.core.telemetry.attributes import safe_attributes, set_attributes
from numprotect.core.telemetry.sampling import SamplingRule

# gRPC services whose calls are never traced: polled constantly, no business meaning.
UNTRACED_GRPC_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.")


def _traced_method(handler_call_details: Any) -> bool:
    # Servers see the method as str, aio clients as bytes.
    method = handler_call_details.method or ""
    if isinstance(method, bytes):
        method = method.decode("ascii", "replace")
    return not str(method).lstrip("/").startswith(UNTRACED_GRPC_SERVICES)


# --- server spans ------------------------------------------------------------------------------------------------
#
# Lean server interceptors. opentelemetry-instrumentation-grpc's server interceptor re-wraps the handler, builds
# attribute dicts, parses the peer and proxies the servicer context on every call, sampled or not, which costs
# a hot path more than the span itself. These wrap each method once, read `traceparent` from the metadata only
# when it is there, and touch attributes and status only when the span records. The CLIENT side keeps the
# instrumentation's interceptors (they inject the same W3C `traceparent` this extracts).
#
# Most calls are not sampled (default 1 % of roots), so the unsampled call is the one to make cheap. The SDK's
# start_as_current_span costs about five times what the decision needs (the sampler's result objects, two
# context-manager layers, tracer metrics): `_ServerSpans.enter` applies the SamplingRule itself and, on a drop,
# puts a NonRecordingSpan with the SDK's ids and flags in the context (so downstream calls still carry the "not
# sampled" traceparent); only a sampled call goes through the SDK, with the very trace id the rule judged
# (`_PresetTraceIds`), so a trace-id-ratio decision stays consistent across services.

_PROPAGATOR = TraceContextTextMapPropagator()
_ERROR_STATUS_CODES = frozenset(code for code in grpc.StatusCode if code != grpc.StatusCode.OK)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_NOT_SAMPLED_RANDOM = TraceFlags(TraceFlags.DEFAULT | TraceFlags.RANDOM_TRACE_ID)


class _PresetTraceIds(RandomIdGenerator):
    """Random ids, except that the next trace id of this thread can be set beforehand (see `_ServerSpans.enter`).

    A thread-local is enough: the preset is consumed by the tracer call that immediately follows it on the same
    thread, with no await in between.
    """

    def __init__(self) -> None:
        self._next = threading.local()

    def preset(self, trace_id: int) -> None:
        self._next.trace_id = trace_id

    def generate_trace_id(self) -> int:
        trace_id: int | None = getattr(self._next, "trace_id", None)
        if trace_id is None:
            return super().generate_trace_id()
        self._next.trace_id = None
        return trace_id


def _parent_context(metadata: Any) -> Context | None:
    carrier: dict[str, str] | None = None
    for key, value in metadata or ():
        if key in ("traceparent", "tracestate"):
            if carrier is None:
                carrier = {}
            carrier[key] = value
    return _PROPAGATOR.extract(carrier) if carrier is not None else None


def _method_attributes(method: str) -> dict[str, AttributeValue]:
    service, _, name = method.lstrip("/").partition("/")
    return safe_attributes({"rpc.system": "grpc", "rpc.service": service, "rpc.method": name})


def _end_status(span: Span, context: Any) -> None:
    """rpc.grpc.status_code (and ERROR with the details) on a recording span, from the servicer context."""
    code = context.code()
    if code is None:
        code = grpc.StatusCode.OK
    elif isinstance(code, int):
        code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    set_attributes(span, {"rpc.grpc.status_code": code.value[0]})
    if code in _ERROR_STATUS_CODES:
        details = context.details()
        if isinstance(details, bytes):
            details = details.decode("utf-8", "replace")
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details or ''}"))


def _end(span: Span, context: Any) -> None:
    """Ends a recording span with the call's status (a non-recording one needs nothing)."""
    if span.is_recording():
        _end_status(span, context)
        span.end()


class _ServerSpans:
    """What both flavours share: the span of a call (`enter`/`leave`) and the handlers already wrapped, per method."""

    def __init__(self, tracer: trace.Tracer, sampling: tuple[SamplingRule, _PresetTraceIds] | None) -> None:
        self._tracer = tracer
        self._sampling = sampling
        self._wrapped = WrappedHandlers(lambda handler, method: self._wrap(handler, method, _method_attributes(method)))

    def _cached(self, handler: Any, handler_call_details: Any) -> Any:
        if handler is None or not _traced_method(handler_call_details):
            return handler
        return self._wrapped.get(handler, handler_call_details.method)

    def enter(self, method: str, attributes: dict[str, AttributeValue], context: Any) -> tuple[Span, object]:
        """The call's SERVER span made current: (span, token for `leave`). The SDK's decision, minus its overhead."""
        parent = _parent_context(context.invocation_metadata())
        if self._sampling is None:
            span = self._sdk_span(method, attributes, parent)
            return span, context_api.attach(trace.set_span_in_context(span, parent))
        rule, ids = self._sampling
        # Without a traceparent the parent is whatever span is current, as for the SDK (normally none): a root
        # here is a root there, so the preset trace id below is always the one the SDK takes.
        current = trace.get_current_span(parent).get_span_context()
        parent_span_context = current if current.is_valid else None
        if parent_span_context is None:
            trace_id = ids.generate_trace_id()
            if rule.samples(trace_id, None):
                ids.preset(trace_id)  # the SDK's sampler judges this very trace id, and agrees
                span = self._sdk_span(method, attributes, parent)
            else:
                span = NonRecordingSpan(SpanContext(trace_id, ids.generate_span_id(), False, _NOT_SAMPLED_RANDOM))
        elif rule.samples(parent_span_context.trace_id, parent_span_context):
            span = self._sdk_span(method, attributes, parent)
        else:
            flags = _NOT_SAMPLED_RANDOM if parent_span_context.trace_flags.random_trace_id else _NOT_SAMPLED
            span = NonRecordingSpan(
                SpanContext(
                    parent_span_context.trace_id,
                    ids.generate_span_id(),
                    False,
                    flags,
                    parent_span_context.trace_state,
                )
            )
        return span, context_api.attach(trace.set_span_in_context(span, parent))

    def _sdk_span(self, method: str, attributes: dict[str, AttributeValue], parent: Context | None) -> Span:
        return self._tracer.start_span(
            method,
            parent,
            SpanKind.SERVER,
            attributes,
            record_exception=False,  # messages may carry data; the status says what failed
            set_status_on_exception=False,
        )

    @staticmethod
    def leave(span: Span, token: object, context: Any) -> None:
        context_api.detach(token)  # type: ignore[arg-type]
        _end(span, context)

    def _wrap(self, handler: Any, method: str, attributes: dict[str, AttributeValue]) -> Any:
        raise NotImplementedError


class _SyncServerSpans(_ServerSpans, grpc.ServerInterceptor):
    def intercept_service(self, continuation: Any, handler_call_details: grpc.HandlerCallDetails) -> Any:
        return self._cached(continuation(handler_call_details), handler_call_details)

    def _wrap(self, handler: Any, method: str, attributes: dict[str, AttributeValue]) -> Any:
        enter, leave = self.enter, self.leave

        def wrap_unary(behavior: Behavior) -> Behavior:
            def unary(request: Any, context: Any) -> Any:
                span, token = enter(method, attributes, context)
                try:
                    return behavior(request, context)
                finally:
                    leave(span, token, context)

            return unary

        def wrap_stream(behavior: Behavior) -> Behavior:
            def stream(request: Any, context: Any) -> Iterator[Any]:
                # A generator resumes on whichever thread pulls it: the span is made current around each step only.
                span, token = enter(method, attributes, context)
                context_api.detach(token)  # type: ignore[arg-type]
                responses = iter(behavior(request, context))
                try:
                    while True:
                        token = context_api.attach(trace.set_span_in_context(span))
                        try:
                            response = next(responses)
                        except StopIteration:
                            return
                        finally:
                            context_api.detach(token)  # type: ignore[arg-type]
                        yield response
                finally:
                    _end(span, context)

            return stream

        return rewrap(handler, wrap_unary, wrap_stream)


class _AioServerSpans(_ServerSpans, grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation: Any, handler_call_details: grpc.HandlerCallDetails) -> Any:
        return self._cached(await continuation(handler_call_details), handler_call_details)

    def _wrap(self, handler: Any, method: str, attributes: dict[str, AttributeValue]) -> Any:
        enter, leave = self.enter, self.leave

        def wrap_unary(behavior: Behavior) -> Behavior:
            async def unary(request: Any, context: Any) -> Any:
                span, token = enter(method, attributes, context)
                try:
                    return await behavior(request, context)
                finally:
                    leave(span, token, context)

            return unary

        def wrap_stream(behavior: Behavior) -> Behavior:
            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                # Each aio call runs in its own task (its own context): the span stays current for the whole stream.
                span, token = enter(method, attributes, context)
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    leave(span, token, context)

            return stream

        return rewrap(handler, wrap_unary, wrap_stream)
