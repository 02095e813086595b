"""SERVER spans: one per call (health and reflection excepted), the sampling decision made without the SDK."""

from __future__ import annotations

import threading
from contextvars import Token
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

from numprotect.core.calls import Method
from numprotect.core.telemetry.attributes import mask_numbers, safe_attributes, set_attributes
from numprotect.core.telemetry.sampling import SamplingRule

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
# context-manager layers, tracer metrics): `ServerSpans.enter` applies the SamplingRule itself and, on a drop,
# puts a NonRecordingSpan with the SDK's ids and flags in the context (so downstream calls still carry the "not
# sampled" traceparent); only a sampled call goes through the SDK, with the very trace id the rule judged
# (`_PresetTraceIds`), so a trace-id-ratio decision stays consistent across services.

_PROPAGATOR = TraceContextTextMapPropagator()
_ERROR_STATUS_CODES = frozenset(code for code in grpc.StatusCode if code != grpc.StatusCode.OK)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_NOT_SAMPLED_RANDOM = TraceFlags(TraceFlags.DEFAULT | TraceFlags.RANDOM_TRACE_ID)


class _PresetTraceIds(RandomIdGenerator):
    """Random ids, except that the next trace id of this thread can be set beforehand (see `ServerSpans.enter`).

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
        # A status message may quote a number (e.g. "binding of 70010000000123 not found"): masked like attributes.
        span.set_status(Status(StatusCode.ERROR, mask_numbers(f"{code.name}: {details or ''}")))


def _end(span: Span, context: Any) -> None:
    """Ends a recording span with the call's status (a non-recording one needs nothing)."""
    if span.is_recording():
        _end_status(span, context)
        span.end()


class ServerSpans:
    """The SERVER span of every call, as a concern of the one call layer (`numprotect.core.calls`).

    The call layer never wraps health and reflection, so they get no span; `for_method` computes the span's
    attributes once per method.
    """

    def __init__(self, tracer: trace.Tracer, sampling: tuple[SamplingRule, _PresetTraceIds] | None) -> None:
        self._tracer = tracer
        self._sampling = sampling

    def for_method(self, method: Method) -> _MethodSpans:
        return _MethodSpans(self, method.path, _method_attributes(method.path))

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


class _MethodSpans:
    """ServerSpans bound to one method."""

    __slots__ = ("_attributes", "_path", "_spans")

    def __init__(self, spans: ServerSpans, path: str, attributes: dict[str, AttributeValue]) -> None:
        self._spans = spans
        self._path = path
        self._attributes = attributes

    def enter(self, context: Any, request: Any = None) -> tuple[Span, object]:
        return self._spans.enter(self._path, self._attributes, context)

    def leave(self, state: object, context: Any) -> None:
        span: Span
        token: Token[Context]
        span, token = state  # type: ignore[misc]
        context_api.detach(token)
        _end(span, context)
