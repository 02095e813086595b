"""OpenTelemetry wiring: a tracer provider from the standard OTEL_* variables, gRPC and Redis spans, helpers.

Configuration (docs/tracing.md):

- OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT: where spans go (OTLP over gRPC). Unset,
  or OTEL_TRACES_EXPORTER=none, or OTEL_SDK_DISABLED=true: tracing is off. No provider, no span concern, no
  Redis instrumentation: the only cost left is a `telemetry.enabled` check in the few places that ask.
- OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG: our default is parentbased_traceidratio at 0.01 (1% of the
  traces that start here; calls inside a traced request follow their parent's decision).
- OTEL_SERVICE_NAME (default numprotect-<service>), OTEL_RESOURCE_ATTRIBUTES (merged over our
  service.version and service.instance.id).

Phone numbers are personal data: span attributes carry them only masked (`masked_number_attribute`), Redis
spans carry the command name and `?` placeholders, never keys or arguments (our keys contain numbers).

Modules: `config` (provider, exporter, resource), `sampling` (the sampler rule), `attributes` (the one masking
path for span attributes, call_ref links), `redis` (Redis spans), `server_spans` (one SERVER span per call),
`client_spans` (trace context and CLIENT spans on channels to peers), `process` (`Telemetry`, what a process holds).
"""

from numprotect.core.telemetry.attributes import (
    ATTRIBUTE_PREFIX,
    link_from_call_ref,
    mask_numbers,
    masked_number_attribute,
    safe_attributes,
    set_attributes,
    set_span_attributes,
)
from numprotect.core.telemetry.config import SERVICE_VERSION, TRACER_NAME, otlp_endpoint, resource_attributes
from numprotect.core.telemetry.process import Telemetry
from numprotect.core.telemetry.sampling import DEFAULT_SAMPLER, DEFAULT_SAMPLER_RATIO, SAMPLERS, SamplingRule

__all__ = [
    "ATTRIBUTE_PREFIX",
    "DEFAULT_SAMPLER",
    "DEFAULT_SAMPLER_RATIO",
    "SAMPLERS",
    "SERVICE_VERSION",
    "TRACER_NAME",
    "SamplingRule",
    "Telemetry",
    "link_from_call_ref",
    "mask_numbers",
    "masked_number_attribute",
    "otlp_endpoint",
    "resource_attributes",
    "safe_attributes",
    "set_attributes",
    "set_span_attributes",
]
