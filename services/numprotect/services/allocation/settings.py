"""Allocation settings from the environment, validated before the server starts."""

from __future__ import annotations

from dataclasses import dataclass

from numprotect.core.pool_keys import MAX_SUBPOOLS
from numprotect.core.settings import Env, SettingsError

_YEAR = 365 * 86400.0
# Sub-pools of a new pool on Redis Cluster: one per primary of a 3-master cluster, three primaries' worth of
# allocations for one pool on any cluster of 3 or more (docs/allocation.md, "Sub-pools"). On one Redis: 1.
DEFAULT_CLUSTER_SUBPOOLS = 3


@dataclass(frozen=True)
class AllocationSettings:
    # Lifetime of a reservation nobody confirms (AllocateNumber without `lease`).
    default_lease_seconds: float
    # Longest lease a caller may ask for.
    max_lease_seconds: float
    # How long a released number waits before it can serve again.
    cooldown_seconds: float
    # Hard cap of live reservations (bindings) on one AXB/AXE number.
    max_bindings_per_number: int
    # AXB/AXE reuse an in-use number below this load before opening a fresh one (see docs/allocation.md).
    target_bindings_per_number: int
    # How many least-loaded numbers one allocation examines.
    candidates: int
    # How many lapsed numbers / ended cool-downs one allocation tidies up on the way.
    sweep_batch: int
    # How long a number's history entries are kept (trimmed as new entries arrive).
    history_retention_seconds: float
    # The longest a binding lives (binding's NUMPROTECT_BINDING_MAX_TTL; set both alike): a confirmed
    # reservation never lasts longer than this from the moment it is confirmed.
    max_binding_lifetime_seconds: float = 90 * 86400.0
    # Sub-pools of a pool created from now on (its first import fixes its count; docs/allocation.md, "Sub-pools").
    subpools: int = 1
    # How often numprotect_pool_numbers is refreshed from the pool counters (and expiries taken for
    # numprotect_bindings_expired); each refresh is GetPoolStats' work for every pool.
    metrics_pool_refresh_seconds: float = 15.0

    @classmethod
    def from_env(cls, env: Env) -> AllocationSettings:
        max_lease = env.seconds("NUMPROTECT_ALLOCATION_MAX_LEASE", 600.0, minimum=1.0, maximum=86400.0)
        lease = env.seconds("NUMPROTECT_ALLOCATION_LEASE", 30.0, minimum=0.1, maximum=86400.0)
        if lease > max_lease:
            raise SettingsError(
                f"NUMPROTECT_ALLOCATION_LEASE={lease:g}s: must not exceed "
                f"NUMPROTECT_ALLOCATION_MAX_LEASE ({max_lease:g}s)"
            )
        max_bindings = env.integer("NUMPROTECT_ALLOCATION_MAX_BINDINGS_PER_NUMBER", 50, minimum=1, maximum=9999)
        target = env.integer("NUMPROTECT_ALLOCATION_TARGET_BINDINGS_PER_NUMBER", min(10, max_bindings), minimum=1)
        if target > max_bindings:
            raise SettingsError(
                f"NUMPROTECT_ALLOCATION_TARGET_BINDINGS_PER_NUMBER={target}: must not exceed "
                f"NUMPROTECT_ALLOCATION_MAX_BINDINGS_PER_NUMBER ({max_bindings})"
            )
        return cls(
            default_lease_seconds=lease,
            max_lease_seconds=max_lease,
            cooldown_seconds=env.seconds("NUMPROTECT_ALLOCATION_COOLDOWN", 86400.0, minimum=0.0, maximum=365 * 86400.0),
            max_bindings_per_number=max_bindings,
            target_bindings_per_number=target,
            candidates=env.integer("NUMPROTECT_ALLOCATION_CANDIDATES", 8, minimum=1, maximum=256),
            sweep_batch=env.integer("NUMPROTECT_ALLOCATION_SWEEP_BATCH", 16, minimum=1, maximum=1024),
            history_retention_seconds=env.seconds(
                "NUMPROTECT_ALLOCATION_HISTORY_RETENTION",
                3 * 365 * 86400.0,
                minimum=86400.0,
                maximum=20 * 365 * 86400.0,
            ),
            max_binding_lifetime_seconds=env.seconds(
                "NUMPROTECT_MAX_BINDING_LIFETIME", 90 * 86400.0, minimum=1.0, maximum=3650 * 86400.0
            ),
            subpools=env.integer(
                "NUMPROTECT_ALLOCATION_SUBPOOLS",
                DEFAULT_CLUSTER_SUBPOOLS if env.raw("NUMPROTECT_REDIS_MODE") == "cluster" else 1,
                minimum=1,
                maximum=MAX_SUBPOOLS,
            ),
            metrics_pool_refresh_seconds=env.seconds(
                "NUMPROTECT_METRICS_POOL_REFRESH", 15.0, minimum=0.05, maximum=3600.0
            ),
        )
