"""The telemetry of one process: its tracer provider (or none) and the spans and traced channels bound to it."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import SpanKind
from opentelemetry.util.types import AttributeValue

from numprotect.core.calls import CallConcern
from numprotect.core.telemetry.attributes import safe_attributes
from numprotect.core.telemetry.client_spans import TracedChannel
from numprotect.core.telemetry.config import SERVICE_VERSION, TRACER_NAME, tracer_provider
from numprotect.core.telemetry.redis import ChildSpansOnly, instrument_client
from numprotect.core.telemetry.sampling import SamplingRule
from numprotect.core.telemetry.server_spans import ServerSpans, _PresetTraceIds

if TYPE_CHECKING:
    from numprotect.core.redis_client import RedisClient, SyncRedisClient


class Telemetry:
    """The tracer provider of one process (or none) and everything bound to it: server spans, channels, Redis."""

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
        self._redis_provider = ChildSpansOnly(provider) if provider is not None else None

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
        built = tracer_provider(environ, default_service_name, exporter=exporter)
        return cls.disabled() if built is None else cls(*built)

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    # --- gRPC -----------------------------------------------------------------------------------------------

    def call_concerns(self) -> list[CallConcern]:
        """What tracing adds to the one call layer: a SERVER span per call (none when tracing is off)."""
        if self.provider is None:
            return []
        return [ServerSpans(self.tracer, self._server_sampling())]

    def _server_sampling(self) -> tuple[SamplingRule, _PresetTraceIds] | None:
        ids = self.provider.id_generator if self.provider is not None else None
        if self.sampling is None or not isinstance(ids, _PresetTraceIds):
            return None
        return self.sampling, ids

    def traced_channel(self, channel: grpc.aio.Channel) -> grpc.aio.Channel:
        """`channel` with its calls' trace context (W3C traceparent) and, inside recording spans, CLIENT spans
        (`client_spans.TracedChannel`: no client interceptor); `channel` itself when tracing is off."""
        if self.provider is None:
            return channel
        return TracedChannel(channel, self.tracer)

    # --- Redis ----------------------------------------------------------------------------------------------

    def instrument_redis(self, client: RedisClient | SyncRedisClient) -> None:
        """CLIENT spans for this client's commands and pipelines (only inside a recording span).

        Per client, not per class: clients created elsewhere stay untouched. The statement attribute is the
        command with `?` for every argument (the instrumentation's sanitised form), so keys and values, which
        contain phone numbers, never reach a span.
        """
        if self._redis_provider is None:
            return
        instrument_client(client, self._redis_provider)

    # --- our own spans --------------------------------------------------------------------------------------

    def child_span(
        self,
        name: str,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, AttributeValue] | None = None,
    ) -> Any:
        """A context manager: a current span named `name` under a recording span, else nothing (INVALID_SPAN).

        A hot path pays one check when its call is not sampled; `attributes` go through the masking path.

        E.g. a hand-written Redis client: `with telemetry.child_span("EVALSHA", kind=SpanKind.CLIENT,
        attributes={"db.system": "redis", "db.statement": "EVALSHA ?"}):` (never keys or arguments).
        """
        if self.provider is None or not trace.get_current_span().is_recording():
            return nullcontext(trace.INVALID_SPAN)
        return self.tracer.start_as_current_span(
            name, kind=kind, attributes=safe_attributes(attributes) if attributes else None
        )

    def shutdown(self) -> None:
        """Flushes pending spans and stops the exporter."""
        if self.provider is not None:
            self.provider.shutdown()
