"""The cdr service's settings (NUMPROTECT_CDR_*), validated in build() before the server starts."""

from __future__ import annotations

from dataclasses import dataclass

from numprotect.core.cdr_keys import MAX_BUCKETS
from numprotect.core.settings import Env, SettingsError

DAY_SECONDS = 86_400.0


@dataclass(frozen=True, slots=True)
class CdrSettings:
    # Most records one IngestCdrs call may carry.
    max_batch: int
    # Most records one StreamCdrs stream may carry, and most rejected records one ingest call may report
    # (a caller past either gets RESOURCE_EXHAUSTED naming the setting).
    max_stream_records: int
    max_rejected: int
    # How long records, their indexes, dedup keys and counters are kept (ms).
    retention_ms: int
    # Records whose call_time lies further in the future than this are rejected (ms).
    max_clock_skew_ms: int
    # Abuse signal: tumbling window length (ms), what counts as a short call (ms answered), and how many
    # short or unanswered calls from one caller to one virtual number in one window flag the pair.
    abuse_window_ms: int
    abuse_short_call_ms: int
    abuse_min_calls: int
    # WatchCdrs: longest blocking XREAD (ms), most concurrent watchers per process, and per caller (a tenant, or
    # the operator) per process.
    watch_block_ms: int
    max_watchers: int
    max_watchers_per_tenant: int
    # GetAbuseSignals: most (virtual number, caller) pairs read and reported per window.
    max_abuse_signals: int
    # Enrichment: committed bindings kept in memory per process (LRU entries; 0 = no cache).
    binding_cache: int
    # Buckets (streams, each its own slot) of an owner (tenant or unmatched) that stores its first record from now
    # on; an owner's count is fixed by its first record (numprotect.core.cdr_keys).
    stream_buckets: int = 1

    @classmethod
    def from_env(cls, env: Env) -> CdrSettings:
        retention = env.seconds("NUMPROTECT_CDR_RETENTION", 180 * DAY_SECONDS, minimum=1, maximum=3650 * DAY_SECONDS)
        window = env.seconds("NUMPROTECT_CDR_ABUSE_WINDOW", 3600, minimum=1, maximum=7 * DAY_SECONDS)
        settings = cls(
            max_batch=env.integer("NUMPROTECT_CDR_MAX_BATCH", 1000, minimum=1, maximum=100_000),
            max_stream_records=env.integer(
                "NUMPROTECT_CDR_MAX_STREAM_RECORDS", 1_000_000, minimum=1, maximum=100_000_000
            ),
            max_rejected=env.integer("NUMPROTECT_CDR_MAX_REJECTED", 1000, minimum=1, maximum=100_000),
            retention_ms=int(retention * 1000),
            max_clock_skew_ms=int(
                env.seconds("NUMPROTECT_CDR_MAX_CLOCK_SKEW", 300, minimum=0, maximum=DAY_SECONDS) * 1000
            ),
            abuse_window_ms=int(window * 1000),
            abuse_short_call_ms=int(env.seconds("NUMPROTECT_CDR_ABUSE_SHORT_CALL", 6, minimum=0, maximum=3600) * 1000),
            abuse_min_calls=env.integer("NUMPROTECT_CDR_ABUSE_MIN_CALLS", 10, minimum=1, maximum=1_000_000),
            watch_block_ms=int(env.seconds("NUMPROTECT_CDR_WATCH_BLOCK", 1, minimum=0.01, maximum=60) * 1000),
            max_watchers=env.integer("NUMPROTECT_CDR_MAX_WATCHERS", 256, minimum=1, maximum=100_000),
            max_watchers_per_tenant=env.integer(
                "NUMPROTECT_CDR_MAX_WATCHERS_PER_TENANT", 8, minimum=1, maximum=100_000
            ),
            max_abuse_signals=env.integer("NUMPROTECT_CDR_MAX_ABUSE_SIGNALS", 1000, minimum=1, maximum=100_000),
            binding_cache=env.integer("NUMPROTECT_CDR_BINDING_CACHE", 100_000, minimum=0, maximum=10_000_000),
            stream_buckets=env.integer("NUMPROTECT_CDR_STREAM_BUCKETS", 1, minimum=1, maximum=MAX_BUCKETS),
        )
        if settings.abuse_window_ms > settings.retention_ms:
            raise SettingsError("NUMPROTECT_CDR_ABUSE_WINDOW: must not be longer than NUMPROTECT_CDR_RETENTION")
        return settings
