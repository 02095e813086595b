"""The allocation service's domain metrics, refreshed on a timer (docs/operations.md, "Domain metrics").

numprotect_pool_numbers{tenant, city, state}: each pool's counts as GetPoolStats reports them (the same script,
which first tidies up lapsed reservations and ended cool-downs), every NUMPROTECT_METRICS_POOL_REFRESH. The states
are GetPoolStats' own: free (available), in_use, locked, cooling. Every allocation replica exports the same values
(queries take max by tenant, city, state).

The pools are found from the blocks: every imported block is in the carriers' table (the identity directory's, one
hash) and its owner record names the pool (tenant, city), fixed once claimed. So one round trip per refresh while no
block was added (the table's version), and one per new block; labels are tenants and city codes only.

numprotect_bindings_expired: a binding's end is observed nowhere but here, when its number's confirmed reservation
lapses and the pool reclaims the number (pool_lib.lua's prune, in whichever script meets it first; the refresh's
own sweep at the latest). The pool keeps the count in Redis; each refresh takes it (GETDEL), so every expiry is
counted once by one allocation process: sum over the processes.
"""

from __future__ import annotations

from typing import Any

from numprotect.core.identity.directory import CARRIER_BLOCKS_KEY, CARRIER_VERSION_KEY
from numprotect.core.metrics import Metrics
from numprotect.core.periodic import Periodic
from numprotect.core.pool_keys import block_owner_key
from numprotect.core.redis_client import RedisClient, as_text
from numprotect.services.allocation.pools import NumberPools, PoolStats

STATES = ("free", "in_use", "locked", "cooling")


def _by_state(stats: PoolStats) -> tuple[int, ...]:
    return stats.available, stats.in_use, stats.locked, stats.cooling


class KnownPools:
    """The (tenant, city) of every imported block's pool: the carriers' table lists the blocks, their owner records
    the pools (an owner never changes, so each block is read once per process)."""

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis
        self._owners: dict[str, tuple[str, str]] = {}
        self._version: Any = None

    async def current(self) -> set[tuple[str, str]]:
        version = await self.redis.get(CARRIER_VERSION_KEY)
        if version is None or version != self._version:
            blocks = [as_text(b) for b in await self.redis.hkeys(CARRIER_BLOCKS_KEY)]
            complete = True
            for block in blocks:
                if block in self._owners:
                    continue
                tenant, city = await self.redis.hmget(block_owner_key(block), ["tenant", "city"])
                if tenant is None or city is None:  # its import is under way: looked at again next time
                    complete = False
                    continue
                self._owners[block] = (as_text(tenant), as_text(city))
            if complete:
                self._version = version
        return set(self._owners.values())


class PoolMetrics(Periodic):
    """Refreshes numprotect_pool_numbers and takes the pools' expiries into numprotect_bindings_expired, every
    `interval_seconds` once started (a failed round, Redis down say: the gauges keep their values until the next)."""

    def __init__(self, pools: NumberPools, redis: RedisClient, metrics: Metrics, interval_seconds: float) -> None:
        super().__init__("allocation pool metrics", self.refresh, interval_seconds)
        self.pools = pools
        self.known = KnownPools(redis)
        self.numbers = metrics.gauge(
            "numprotect_pool_numbers",
            "Numbers of a tenant's pool in a city by state (GetPoolStats' counts, refreshed on a timer)",
            ("tenant", "city", "state"),
        )
        self.expired = metrics.counter(
            "numprotect_bindings_expired",
            "Bindings that ended by expiry, counted when allocation reclaims their number (each once, by one process)",
        )
        self._children: dict[tuple[str, str], tuple[Any, ...]] = {}

    async def refresh(self) -> None:
        """One round: every pool's gauges and expiries."""
        for tenant, city in sorted(await self.known.current()):
            stats = await self.pools.stats(tenant, city)
            children = self._children.get((tenant, city))
            if children is None:
                children = self._children[(tenant, city)] = tuple(
                    self.numbers.labels(tenant, city, state) for state in STATES
                )
            for child, value in zip(children, _by_state(stats), strict=True):
                child.set(value)
            expired = await self.pools.take_expired(tenant, city)
            if expired:
                self.expired.inc(expired)
