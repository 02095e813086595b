"""OpenTelemetry wiring: a tracer provider from the standard OTEL_* variables and the gRPC interceptors.

With no OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_TRACES_EXPORTER=none) nothing is exported and no
interceptor is installed, so tracing costs nothing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

import grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from numprotect_core.settings import Env

SERVICE_VERSION = "0.1.0"


class Telemetry:
    """Holds the tracer provider of one process (or none) and hands out interceptors bound to it."""

    def __init__(self, provider: TracerProvider | None) -> None:
        self.provider = provider

    @classmethod
    def disabled(cls) -> Telemetry:
        return cls(None)

    @classmethod
    def from_env(cls, environ: Mapping[str, str], default_service_name: str) -> Telemetry:
        env = Env(environ)
        endpoint = env.raw("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.raw("OTEL_EXPORTER_OTLP_ENDPOINT")
        if endpoint is None or env.text("OTEL_TRACES_EXPORTER", "otlp") == "none":
            return cls.disabled()
        # Imported only when exporting, so an untraced process does not pay for the exporter.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        resource = Resource.create(
            {
                "service.name": env.text("OTEL_SERVICE_NAME", default_service_name),
                "service.version": SERVICE_VERSION,
                "service.instance.id": f"{socket.gethostname()}-{os.getpid()}",
            }
        )
        # The sampler comes from OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (SDK default: parentbased_always_on).
        provider = TracerProvider(resource=resource)
        insecure = endpoint.startswith("http://") or "://" not in endpoint
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=insecure)))
        return cls(provider)

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        if self.provider is None:
            return []
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

        # Health checks are polled constantly and carry no business meaning: never traced.
        return [
            aio_server_interceptor(  # type: ignore[no-untyped-call]
                tracer_provider=self.provider, filter_=filters.negate(filters.health_check())
            )
        ]

    def client_interceptors(self) -> list[Any]:
        if self.provider is None:
            return []
        from opentelemetry.instrumentation.grpc import aio_client_interceptors, filters

        return list(
            aio_client_interceptors(  # type: ignore[no-untyped-call]
                tracer_provider=self.provider, filter_=filters.negate(filters.health_check())
            )
        )

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()
