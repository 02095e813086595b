"""Redis CLIENT spans (opentelemetry-instrumentation-redis), only as children of a recording span."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Span

if TYPE_CHECKING:
    from numprotect.core.redis_client import RedisClient, SyncRedisClient


def instrument_client(client: RedisClient | SyncRedisClient, provider: trace.TracerProvider) -> None:
    """CLIENT spans for this client's commands and pipelines from `provider`'s tracers (see Telemetry)."""
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    RedisInstrumentor.instrument_client(client, tracer_provider=provider)
    _skip_instrumentation_when_not_recording(client)


def _skip_instrumentation_when_not_recording(client: Any) -> None:
    """Outside a recording span (unsampled calls, probes) commands and pipelines go straight to redis-py.

    The instrumentation's wrappers cost a lot even when they make no span: each `pipeline()` wraps the new
    pipeline's methods with wrapt (~7 us), and its `execute` formats every queued command's arguments before
    asking whether to record (an unsampled pipeline of 3 cost ~86 us of CPU more than a plain one). So the
    choice is made once, at the call: a pipeline made outside a recording span is redis-py's own, and a command
    is handed to the plain method (returning its coroutine: no extra coroutine per command).
    """
    traced = client.execute_command
    plain = getattr(traced, "__wrapped__", None)
    if plain is None or not inspect.iscoroutinefunction(plain):
        return
    get_current_span = trace.get_current_span

    def execute_command(*args: Any, **options: Any) -> Any:
        return (traced if get_current_span().is_recording() else plain)(*args, **options)

    client.execute_command = execute_command
    traced_pipeline = client.pipeline
    plain_pipeline = getattr(traced_pipeline, "__wrapped__", None)
    if plain_pipeline is None:
        return

    def pipeline(*args: Any, **options: Any) -> Any:
        return (traced_pipeline if get_current_span().is_recording() else plain_pipeline)(*args, **options)

    client.pipeline = pipeline


class ChildSpansOnly(trace.TracerProvider):
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
