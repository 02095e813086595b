"""OpenTelemetry wiring: a tracer provider from the standard OTEL_* variables, interceptors, Redis spans, helpers.

Configuration (docs/tracing.md):

- OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT: where spans go (OTLP over gRPC). Unset,
  or OTEL_TRACES_EXPORTER=none, or OTEL_SDK_DISABLED=true: tracing is off. No provider, no interceptor, no
  Redis instrumentation: the only cost left is a `telemetry.enabled` check in the few places that ask.
- OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG: our default is parentbased_traceidratio at 0.01 (1% of the
  traces that start here; calls inside a traced request follow their parent's decision).
- OTEL_SERVICE_NAME (default numprotect-<service>), OTEL_RESOURCE_ATTRIBUTES (merged over our
  service.version and service.instance.id).

Phone numbers are personal data: span attributes carry them only masked (`masked_number_attribute`), Redis
spans carry the command name and `?` placeholders, never keys or arguments (our keys contain numbers).
"""

from __future__ import annotations

import inspect
import os
import re
import socket
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import grpc
from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import (
    Link,
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

from numprotect.core.call_ref import CallRef
from numprotect.core.interceptors import Behavior, WrappedHandlers, rewrap
from numprotect.core.phone import mask
from numprotect.core.settings import Env, SettingsError

if TYPE_CHECKING:
    from numprotect.core.redis_client import RedisClient

SERVICE_VERSION = "0.1.0"
ATTRIBUTE_PREFIX = "numprotect."
TRACER_NAME = "numprotect"

# Our documented default when the operator sets no OTEL_TRACES_SAMPLER: keep 1 trace in 100 that starts in
# this service, and follow the caller's decision for calls that arrive inside a trace. 1 %, not 10 %: at 10 %
# the recorded calls alone cost the translation hot path about 10 % of its throughput (docs/tracing.md, "Cost").
DEFAULT_SAMPLER = "parentbased_traceidratio"
DEFAULT_SAMPLER_RATIO = 0.01
SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
# gRPC services whose calls are never traced: polled constantly, no business meaning.
UNTRACED_GRPC_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.")

# Values that are phone numbers: mobile, fixed line, 700 virtual numbers and blocks, with or without +86.
_NUMBER_VALUE = re.compile(r"(?:\+?86|0086)?(?:1[3-9]\d{9}|0\d{9,11}|700\d{8}|700\d{12})")


@dataclass(frozen=True, slots=True)
class SamplingRule:
    """The sampler OTEL_TRACES_SAMPLER names, kept as a rule the server interceptor can apply without the SDK.

    `samples` gives the same decision as `sampler()` (the SDK sampler the provider uses) for a server span: the
    parent's sampled flag for the parent-based samplers when the call carries a traceparent, else the trace id
    compared with the ratio's bound, exactly as TraceIdRatioBased does (always_on is ratio 1, always_off 0).
    """

    name: str
    ratio: float
    _bound: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_bound", TraceIdRatioBased.get_bound_for_rate(self.ratio))

    @classmethod
    def from_env(cls, env: Env) -> SamplingRule:
        """OTEL_TRACES_SAMPLER (default parentbased_traceidratio) and OTEL_TRACES_SAMPLER_ARG.

        OTEL_TRACES_SAMPLER_ARG is the ratio of the ratio samplers, 0 to 1, default 0.01 (ours, also when the
        operator names a ratio sampler without an argument). Unknown names and bad ratios are SettingsErrors.
        """
        name = env.choice("OTEL_TRACES_SAMPLER", DEFAULT_SAMPLER, SAMPLERS)
        if name.endswith("traceidratio"):
            ratio = env.number("OTEL_TRACES_SAMPLER_ARG", DEFAULT_SAMPLER_RATIO, minimum=0.0, maximum=1.0)
        else:
            ratio = 1.0 if name.endswith("always_on") else 0.0
        return cls(name, ratio)

    @property
    def parent_based(self) -> bool:
        return self.name.startswith("parentbased_")

    def sampler(self) -> Sampler:
        """The SDK sampler of this rule, for the tracer provider (every span that is not a server span)."""
        if self.name.endswith("traceidratio"):
            root: Sampler = TraceIdRatioBased(self.ratio)
        else:
            root = ALWAYS_ON if self.name.endswith("always_on") else ALWAYS_OFF
        return ParentBased(root) if self.parent_based else root

    def samples(self, trace_id: int, parent: SpanContext | None) -> bool:
        """The decision for a span of `trace_id` whose (valid) parent is `parent`, or None for a root."""
        if parent is not None and self.parent_based:
            return parent.trace_flags.sampled
        return trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < self._bound


def resource_attributes(env: Env, default_service_name: str) -> dict[str, str]:
    """Ours (service.version, service.instance.id), then OTEL_RESOURCE_ATTRIBUTES, then OTEL_SERVICE_NAME."""
    attributes = {
        "service.name": default_service_name,
        "service.version": SERVICE_VERSION,
        "service.instance.id": f"{socket.gethostname()}-{os.getpid()}",
    }
    raw = env.raw("OTEL_RESOURCE_ATTRIBUTES")
    if raw is not None:
        for pair in raw.split(","):
            if not pair.strip():
                continue
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise SettingsError(f"OTEL_RESOURCE_ATTRIBUTES={raw!r}: must be key=value pairs separated by commas")
            attributes[key.strip()] = unquote(value.strip())
    service_name = env.raw("OTEL_SERVICE_NAME")
    if service_name is not None:
        attributes["service.name"] = service_name
    return attributes


def otlp_endpoint(env: Env) -> str | None:
    return env.raw("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.raw("OTEL_EXPORTER_OTLP_ENDPOINT")


def _insecure(env: Env, endpoint: str) -> bool:
    for name in ("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "OTEL_EXPORTER_OTLP_INSECURE"):
        if env.raw(name) is not None:
            return env.flag(name, False)
    return not endpoint.startswith("https://")


def _traced_method(handler_call_details: Any) -> bool:
    # Servers see the method as str, aio clients as bytes.
    method = handler_call_details.method or ""
    if isinstance(method, bytes):
        method = method.decode("ascii", "replace")
    return not str(method).lstrip("/").startswith(UNTRACED_GRPC_SERVICES)


class Telemetry:
    """The tracer provider of one process (or none) and everything bound to it: interceptors, Redis, spans."""

    def __init__(self, provider: TracerProvider | None, sampling: SamplingRule | None = None) -> None:
        """`sampling` is the rule the provider's sampler follows (from_env passes it, with a provider whose
        id generator is `_PresetTraceIds`): server spans then decide without the SDK. Without it (a provider
        built elsewhere, e.g. by tests) every server span goes through the SDK."""
        self.provider = provider
        self.sampling = sampling
        self.tracer: trace.Tracer = (
            provider.get_tracer(TRACER_NAME, SERVICE_VERSION) if provider is not None else trace.NoOpTracer()
        )
        # Redis spans only as children of a recording span (never root traces from probes or background loops).
        self._redis_provider = _ChildSpansOnly(provider) if provider is not None else None

    @classmethod
    def disabled(cls) -> Telemetry:
        return cls(None)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str], default_service_name: str, *, exporter: SpanExporter | None = None
    ) -> Telemetry:
        """The process's telemetry from OTEL_* variables; disabled without an endpoint.

        `exporter` replaces the OTLP exporter (tests); the settings are read and validated all the same.
        """
        env = Env(environ)
        endpoint = otlp_endpoint(env)
        off = (
            env.flag("OTEL_SDK_DISABLED", False)
            or env.text("OTEL_TRACES_EXPORTER", "otlp").lower() == "none"
            or (endpoint is None and exporter is None)
        )
        if off:
            return cls.disabled()
        sampling = SamplingRule.from_env(env)
        resource = Resource.create(resource_attributes(env, default_service_name))
        if exporter is None:
            assert endpoint is not None
            # Imported only when exporting, so an untraced process does not load the exporter.
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=endpoint, insecure=_insecure(env, endpoint))
        provider = TracerProvider(resource=resource, sampler=sampling.sampler(), id_generator=_PresetTraceIds())
        # Batching settings come from OTEL_BSP_* (schedule delay, queue and batch sizes).
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider, sampling)

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    # --- gRPC -----------------------------------------------------------------------------------------------

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """grpc.aio server interceptors: one SERVER span per call (health and reflection excepted)."""
        if self.provider is None:
            return []
        return [_AioServerSpans(self.tracer, self._server_sampling())]

    def sync_server_interceptors(self) -> list[grpc.ServerInterceptor]:
        """The same for a synchronous grpc.server (thread pool)."""
        if self.provider is None:
            return []
        return [_SyncServerSpans(self.tracer, self._server_sampling())]

    def _server_sampling(self) -> tuple[SamplingRule, _PresetTraceIds] | None:
        ids = self.provider.id_generator if self.provider is not None else None
        if self.sampling is None or not isinstance(ids, _PresetTraceIds):
            return None
        return self.sampling, ids

    def client_interceptors(self) -> list[Any]:
        """grpc.aio channel interceptors: one CLIENT span per call, W3C trace context sent in the metadata."""
        if self.provider is None:
            return []
        from opentelemetry.instrumentation.grpc import aio_client_interceptors

        return list(aio_client_interceptors(tracer_provider=self.provider, filter_=_traced_method))  # type: ignore[no-untyped-call]

    # --- Redis ----------------------------------------------------------------------------------------------

    def instrument_redis(self, client: RedisClient) -> None:
        """CLIENT spans for this client's commands and pipelines (only inside a recording span).

        Per client, not per class: clients created elsewhere stay untouched. The statement attribute is the
        command with `?` for every argument (the instrumentation's sanitised form), so keys and values, which
        contain phone numbers, never reach a span.
        """
        if self._redis_provider is None:
            return
        from opentelemetry.instrumentation.redis import RedisInstrumentor

        RedisInstrumentor.instrument_client(client, tracer_provider=self._redis_provider)
        _skip_instrumentation_when_not_recording(client)

    # --- our own spans --------------------------------------------------------------------------------------

    def span(
        self,
        name: str,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        links: Sequence[Link] = (),
        attributes: Mapping[str, AttributeValue] | None = None,
    ) -> Any:
        """A context manager: a current span named `name` (with links) when tracing is on, else nothing.

        `with telemetry.span("cdr.ingest", links=links) as span:` yields the span (INVALID_SPAN when off).
        """
        if self.provider is None:
            return nullcontext(trace.INVALID_SPAN)
        return self.tracer.start_as_current_span(name, kind=kind, links=list(links), attributes=attributes)

    def child_span(
        self,
        name: str,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, AttributeValue] | None = None,
    ) -> Any:
        """Like `span`, but only under a recording span: a hot path pays one check when its call is not sampled.

        E.g. a hand-written Redis client: `with telemetry.child_span("EVALSHA", kind=SpanKind.CLIENT,
        attributes={"db.system": "redis", "db.statement": "EVALSHA ?"}):` (never keys or arguments).
        """
        if self.provider is None or not trace.get_current_span().is_recording():
            return nullcontext(trace.INVALID_SPAN)
        return self.tracer.start_as_current_span(name, kind=kind, attributes=attributes)

    def current_ids(self) -> tuple[int, int]:
        """(trace_id, span_id) of the current span when it is sampled, else (0, 0): what a CallRef carries.

        Costs one attribute check when tracing is off.
        """
        if self.provider is None:
            return (0, 0)
        return current_trace_ids()

    def shutdown(self) -> None:
        """Flushes pending spans and stops the exporter."""
        if self.provider is not None:
            self.provider.shutdown()


# --- helpers for servicers (work whether tracing is on or off) -----------------------------------------------


def current_trace_ids() -> tuple[int, int]:
    """(trace_id, span_id) of the current span when it is sampled, else (0, 0)."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid and context.trace_flags.sampled:
        return (context.trace_id, context.span_id)
    return (0, 0)


def _safe_value(value: AttributeValue) -> AttributeValue:
    # A safety net: a value that is a phone number is masked even when the caller forgot to.
    if isinstance(value, str) and _NUMBER_VALUE.fullmatch(value):
        return mask(value)
    return value


def set_span_attributes(span: Span | None = None, /, **attributes: AttributeValue | None) -> None:
    """Sets `numprotect.<name>` attributes on `span` (default: the current span); None values are skipped.

    `set_span_attributes(tenant="t1", mode="AXB", decision="CONNECT", binding_id=bid)`. Does nothing when
    the span is not recording (tracing off or not sampled). A value that is a phone number is masked.
    """
    target = span if span is not None else trace.get_current_span()
    if not target.is_recording():
        return
    # One set_attributes call: the SDK span takes its lock once, not once per attribute.
    target.set_attributes(
        {ATTRIBUTE_PREFIX + name: _safe_value(value) for name, value in attributes.items() if value is not None}
    )


def masked_number_attribute(name: str, number: str, span: Span | None = None) -> None:
    """Sets `numprotect.<name>` to the masked number (138****5678) on `span` (default: the current span)."""
    target = span if span is not None else trace.get_current_span()
    if target.is_recording() and number:
        target.set_attribute(ATTRIBUTE_PREFIX + name, mask(number))


def link_from_call_ref(call_ref: CallRef | str) -> Link | None:
    """A span link to the translation span a call_ref names, or None (untraced call, or not our call_ref)."""
    if isinstance(call_ref, str):
        if not call_ref:
            return None
        try:
            call_ref = CallRef.decode(call_ref)
        except ValueError:
            return None
    if not call_ref.trace_id or not call_ref.span_id:
        return None
    context = SpanContext(
        trace_id=call_ref.trace_id, span_id=call_ref.span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED)
    )
    if not context.is_valid:
        return None
    return Link(context, {ATTRIBUTE_PREFIX + "link": "call_setup"})


def links_from_call_refs(call_refs: Sequence[CallRef | str]) -> list[Link]:
    """The links of several call_refs (a CDR batch), skipping those without trace ids."""
    links = []
    for call_ref in call_refs:
        link = link_from_call_ref(call_ref)
        if link is not None:
            links.append(link)
    return links


def add_call_ref_link(call_ref: CallRef | str, span: Span | None = None) -> bool:
    """Links `span` (default: the current span) to the call setup `call_ref` names; True when linked."""
    target = span if span is not None else trace.get_current_span()
    if not target.is_recording():
        return False
    link = link_from_call_ref(call_ref)
    if link is None:
        return False
    target.add_link(link.context, link.attributes)
    return True


# --- Redis spans only inside a recording span ------------------------------------------------------------------


def _skip_instrumentation_when_not_recording(client: Any) -> None:
    """Commands outside a recording span (unsampled calls, probes) go straight to redis-py, not via the wrapper."""
    traced = client.execute_command
    plain = getattr(traced, "__wrapped__", None)
    if plain is None or not inspect.iscoroutinefunction(plain):
        return
    get_current_span = trace.get_current_span

    async def execute_command(*args: Any, **options: Any) -> Any:
        if get_current_span().is_recording():
            return await traced(*args, **options)
        return await plain(*args, **options)

    client.execute_command = execute_command


class _ChildSpansOnly(trace.TracerProvider):
    """A tracer provider whose tracers start a span only when the current span records, else a no-op span."""

    def __init__(self, provider: TracerProvider) -> None:
        self._provider = provider

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return _ChildOnlyTracer(self._provider.get_tracer(*args, **kwargs))


class _ChildOnlyTracer(trace.Tracer):
    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    def start_span(self, name: str, context: Any = None, *args: Any, **kwargs: Any) -> Span:
        if not trace.get_current_span(context).is_recording():
            return trace.INVALID_SPAN
        return self._tracer.start_span(name, context, *args, **kwargs)

    @contextmanager
    def start_as_current_span(  # type: ignore[override]
        self, name: str, context: Any = None, *args: Any, **kwargs: Any
    ) -> Iterator[Span]:
        if not trace.get_current_span(context).is_recording():
            yield trace.INVALID_SPAN
            return
        with self._tracer.start_as_current_span(name, context, *args, **kwargs) as span:
            yield span


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
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def _end_status(span: Span, context: Any) -> None:
    """rpc.grpc.status_code (and ERROR with the details) on a recording span, from the servicer context."""
    code = context.code()
    if code is None:
        code = grpc.StatusCode.OK
    elif isinstance(code, int):
        code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    span.set_attribute("rpc.grpc.status_code", code.value[0])
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
