"""The sampling rule OTEL_TRACES_SAMPLER names, as the SDK sampler and as a decision server spans apply themselves."""

from __future__ import annotations

from dataclasses import dataclass, field

from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import SpanContext

from numprotect.core.settings import Env

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
