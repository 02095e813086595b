"""The cdr service's domain metrics (docs/operations.md, "Domain metrics"), made from the process's Metrics."""

from __future__ import annotations

from numprotect.core.metrics import Metrics

# Each record a carrier sends ends in exactly one outcome: stored and matched to a binding (ingested), stored
# without a binding (unmatched), already stored (duplicate), or refused (rejected).
OUTCOMES = ("ingested", "unmatched", "duplicate", "rejected")
# Ingestion time minus the call's end: 1 s .. 1 day.
LAG_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
# The abuse signal ingest.lua raises: short + unanswered calls of a (virtual number, caller) pair in one window
# reached NUMPROTECT_CDR_ABUSE_MIN_CALLS (docs/cdr.md, "Counters and abuse signals").
SHORT_OR_UNANSWERED = "short_or_unanswered_calls"


class CdrCounts:
    """numprotect_cdrs{outcome}, numprotect_cdr_ingestion_lag_seconds and numprotect_abuse_flags{signal}."""

    def __init__(self, metrics: Metrics) -> None:
        cdrs = metrics.counter("numprotect_cdrs", "CDRs received, by outcome (each record once)", ("outcome",))
        self.ingested, self.unmatched, self.duplicate, self.rejected = (cdrs.labels(o) for o in OUTCOMES)
        self.lag = metrics.histogram(
            "numprotect_cdr_ingestion_lag_seconds",
            "Seconds from a call's end (release_time) to the storing of its CDR",
            buckets=LAG_BUCKETS,
        )
        flags = metrics.counter(
            "numprotect_abuse_flags", "(virtual number, caller) pairs flagged, each once per window", ("signal",)
        )
        self.abuse_flagged = flags.labels(SHORT_OR_UNANSWERED)

    @classmethod
    def uncounted(cls) -> CdrCounts:
        """No-op metrics (the store or ingestor built without a process's metrics, e.g. in tests of the store)."""
        return cls(Metrics("cdr", enabled=False))
