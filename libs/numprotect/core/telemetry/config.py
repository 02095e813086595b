"""The tracer provider from the standard OTEL_* variables: exporter, resource, sampler (docs/tracing.md)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from urllib.parse import unquote

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from numprotect.core.settings import Env, SettingsError
from numprotect.core.telemetry.sampling import SamplingRule
from numprotect.core.telemetry.server_spans import _PresetTraceIds

SERVICE_VERSION = "0.1.0"
TRACER_NAME = "numprotect"


def tracer_provider(
    environ: Mapping[str, str], default_service_name: str, *, exporter: SpanExporter | None = None
) -> tuple[TracerProvider, SamplingRule] | None:
    """The process's tracer provider and the rule its sampler follows, from OTEL_* variables; None when off.

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
        return None
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
    return provider, sampling


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
