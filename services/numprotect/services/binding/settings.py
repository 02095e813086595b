"""Binding settings from the environment, validated before the server starts."""

from __future__ import annotations

from dataclasses import dataclass

from numprotect.core.settings import Env, SettingsError
from numprotect.services.binding.batching import DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_ITEMS, BatchLimits

_DAY = 86400.0
# The steps of a create (create.py), as a StepHook and NUMPROTECT_BINDING_FAILPOINT name them.
CREATE_STEPS = ("claim", "allocate", "write", "confirm", "commit", "complete")
FAILPOINT_ACTIONS = ("crash", "error")
# Allocation answers a batch call of more items INVALID_ARGUMENT (its MAX_BATCH_ITEMS, docs/allocation.md).
ALLOCATION_BATCH_LIMIT = 256


@dataclass(frozen=True)
class BindingSettings:
    # Shortest and longest ttl a create accepts; the longest also caps a binding's whole life (create + max).
    min_ttl_seconds: float
    max_ttl_seconds: float
    # ttl of a create that names none.
    default_ttl_seconds: float
    # How long records and per-number history stay readable after a binding ended (traceability).
    history_retention_seconds: float
    # How long one create may take before a duplicate may take its order over; also the reservation lease.
    create_lease_seconds: float
    # Deadline of each call to the allocation service.
    allocation_timeout_seconds: float
    # Natural batching of the calls to allocation (batching.py): items a batch call carries at most, and batch
    # calls of one method on their way at once (requests arriving meanwhile wait for the next batch).
    allocation_max_batch: int = DEFAULT_MAX_ITEMS
    allocation_batches_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    # Per-principal rate limits (token buckets in each replica's memory: the cluster admits replicas x the rate).
    create_rate: float = 2000.0
    create_burst: int = 2000
    trace_rate: float = 50.0
    trace_burst: int = 100
    # How often each process resolves creates that did not finish past their deadline (the pending-creates list).
    recovery_interval_seconds: float = 5.0
    # Fault injection for tests only: "<step>:crash" (SIGKILL of the process) or "<step>:error" (UNAVAILABLE)
    # before that step of every create; "" (the default) for none.
    failpoint: str = ""

    # The same durations in milliseconds, the unit every stored time and Redis expiry uses.
    @property
    def min_ttl_ms(self) -> int:
        return int(self.min_ttl_seconds * 1000)

    @property
    def max_ttl_ms(self) -> int:
        return int(self.max_ttl_seconds * 1000)

    @property
    def default_ttl_ms(self) -> int:
        return int(self.default_ttl_seconds * 1000)

    @property
    def retention_ms(self) -> int:
        return int(self.history_retention_seconds * 1000)

    @property
    def create_lease_ms(self) -> int:
        return int(self.create_lease_seconds * 1000)

    @property
    def allocation_batching(self) -> BatchLimits:
        return BatchLimits(self.allocation_max_batch, self.allocation_batches_in_flight)

    @classmethod
    def from_env(cls, env: Env) -> BindingSettings:
        min_ttl = env.seconds("NUMPROTECT_BINDING_MIN_TTL", 60.0, minimum=0.1, maximum=90 * _DAY)
        max_ttl = env.seconds("NUMPROTECT_BINDING_MAX_TTL", 90 * _DAY, minimum=1.0, maximum=3650 * _DAY)
        if min_ttl > max_ttl:
            raise SettingsError(
                f"NUMPROTECT_BINDING_MIN_TTL={min_ttl:g}s: must not exceed NUMPROTECT_BINDING_MAX_TTL ({max_ttl:g}s)"
            )
        default_ttl = env.seconds("NUMPROTECT_BINDING_DEFAULT_TTL", 7200.0, minimum=0.1, maximum=3650 * _DAY)
        if not min_ttl <= default_ttl <= max_ttl:
            raise SettingsError(
                f"NUMPROTECT_BINDING_DEFAULT_TTL={default_ttl:g}s: must be between NUMPROTECT_BINDING_MIN_TTL "
                f"({min_ttl:g}s) and NUMPROTECT_BINDING_MAX_TTL ({max_ttl:g}s)"
            )
        return cls(
            min_ttl_seconds=min_ttl,
            max_ttl_seconds=max_ttl,
            default_ttl_seconds=default_ttl,
            history_retention_seconds=env.seconds(
                "NUMPROTECT_BINDING_HISTORY_RETENTION", 180 * _DAY, minimum=1.0, maximum=3650 * _DAY
            ),
            create_lease_seconds=env.seconds("NUMPROTECT_BINDING_CREATE_LEASE", 10.0, minimum=0.5, maximum=600.0),
            allocation_timeout_seconds=env.seconds(
                "NUMPROTECT_BINDING_ALLOCATION_TIMEOUT", 5.0, minimum=0.05, maximum=120.0
            ),
            allocation_max_batch=env.integer(
                "NUMPROTECT_BINDING_ALLOCATION_MAX_BATCH",
                DEFAULT_MAX_ITEMS,
                minimum=1,
                maximum=ALLOCATION_BATCH_LIMIT,
            ),
            allocation_batches_in_flight=env.integer(
                "NUMPROTECT_BINDING_ALLOCATION_BATCHES_IN_FLIGHT", DEFAULT_MAX_IN_FLIGHT, minimum=1, maximum=64
            ),
            create_rate=env.number("NUMPROTECT_CREATE_BINDING_RATE", 2000.0, minimum=0.01, maximum=1e6),
            create_burst=env.integer("NUMPROTECT_CREATE_BINDING_BURST", 2000, minimum=1, maximum=1_000_000),
            trace_rate=env.number("NUMPROTECT_TRACE_NUMBER_RATE", 50.0, minimum=0.01, maximum=1e6),
            trace_burst=env.integer("NUMPROTECT_TRACE_NUMBER_BURST", 100, minimum=1, maximum=1_000_000),
            recovery_interval_seconds=env.seconds(
                "NUMPROTECT_BINDING_RECOVERY_INTERVAL", 5.0, minimum=0.05, maximum=600.0
            ),
            failpoint=_failpoint(env.text("NUMPROTECT_BINDING_FAILPOINT", "")),
        )


def _failpoint(raw: str) -> str:
    if not raw:
        return ""
    step, _, action = raw.partition(":")
    if step not in CREATE_STEPS or action not in FAILPOINT_ACTIONS:
        raise SettingsError(
            f"NUMPROTECT_BINDING_FAILPOINT={raw}: must be <step>:<action> with step one of {', '.join(CREATE_STEPS)} "
            f"and action one of {', '.join(FAILPOINT_ACTIONS)} (tests only; unset in production)"
        )
    return raw
