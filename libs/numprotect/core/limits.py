"""The one bound on concurrent Redis work per process.

Why a limiter class and not redis-py's `BlockingConnectionPool`:

- `BlockingConnectionPool` bounds a client by its connections: a command that finds every connection busy
  waits up to a timeout for one, then fails with ConnectionError("No connection available."), which the call
  layer answers as UNAVAILABLE. That serves a blocking standalone client
  (`redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(url, max_connections=n, timeout=t))`).
  The blocking cluster client takes one per node (`connection_pool_class`) but treats its timeout like a failed
  node (retries, reloads the slot map; seen with redis-py 8.1), so a blocking client is best sized never to
  wait: a connection per thread that uses it (the thread-pool server's workers, the health probe's one thread).
- It does not serve the asyncio services. `redis.asyncio.RedisCluster` has no blocking pool: each node keeps
  its own list of connections and raises MaxConnectionsError at once when it is full (redis-py 8.1), so a burst
  would fail in cluster mode where it waits in standalone mode. The asyncio services therefore share one
  `ConcurrencyLimit` per process, above the client, which behaves the same on both: an operation holds one
  place while it talks to Redis, waits up to NUMPROTECT_REDIS_TIMEOUT for a place, then gets UNAVAILABLE
  (retryable), never INTERNAL and never an unbounded queue. `ConcurrencyLimit.for_redis` sizes it to the
  client's NUMPROTECT_REDIS_MAX_CONNECTIONS: one place per connection.

Rule for holders: one place covers one connection (per node) at a time, so an operation that sends commands
concurrently (asyncio.gather) takes one place per concurrent branch, never one place for all of them.

The same class bounds other scarce things with no waiting at all (`wait_seconds=0`), answering
RESOURCE_EXHAUSTED: cdr's concurrent WatchCdrs streams.

`RateLimit` is the other kind of bound: calls per second per caller (a token bucket per key, e.g. per principal),
in the process's memory, so a limit costs no Redis round trip and N replicas admit N times the limit in total.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from types import TracebackType

from numprotect.core.errors import DomainError, ResourceExhausted, Unavailable
from numprotect.core.settings import RedisSettings


class ConcurrencyLimit:
    """At most `limit` holders at once (`async with limit:`); a caller waits up to `wait_seconds` for a place.

    A caller still waiting when the time is up gets `overloaded()`: UNAVAILABLE by default (waiting longer
    would not help now, a retry soon may), or RESOURCE_EXHAUSTED with `exhausted=True` (a hard cap the caller
    should not retry against at once).
    """

    def __init__(self, limit: int, *, wait_seconds: float, name: str, exhausted: bool = False) -> None:
        if limit < 1:
            raise ValueError("a concurrency limit needs at least one place")
        self.limit = limit
        self.wait_seconds = wait_seconds
        self.name = name
        self.exhausted = exhausted
        self._places = asyncio.Semaphore(limit)
        self._held = 0

    @classmethod
    def for_redis(cls, settings: RedisSettings) -> ConcurrencyLimit:
        """The process's bound on Redis operations: one place per pooled connection, waiting up to the timeout."""
        return cls(settings.max_connections, wait_seconds=settings.timeout_seconds, name="redis operations")

    @property
    def held(self) -> int:
        """Places in use now."""
        return self._held

    def overloaded(self) -> DomainError:
        message = f"too many concurrent {self.name} on this server (limit {self.limit}); retry shortly"
        if self.exhausted:
            return ResourceExhausted(message, subject=self.name)
        return Unavailable(message)

    async def __aenter__(self) -> None:
        if not self._places.locked():
            await self._places.acquire()  # a free place: no timer
        elif self.wait_seconds <= 0:
            raise self.overloaded()
        else:
            try:
                # asyncio.timeout, not wait_for (gh-86296); Semaphore.acquire gives a place back if cancelled
                # after it was granted, so a timeout never leaks one.
                async with asyncio.timeout(self.wait_seconds):
                    await self._places.acquire()
            except TimeoutError:
                raise self.overloaded() from None
        self._held += 1

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._held -= 1
        self._places.release()


class RateLimit:
    """A token bucket per key: `rate` calls per second on average, bursts of up to `burst`; RESOURCE_EXHAUSTED
    (google.rpc.QuotaFailure, subject `name`) once a key's bucket is empty.

    Memory is bounded: only the `max_keys` most recently used buckets are kept (least recently used goes first).
    A forgotten key starts again with a full bucket, which only matters to a caller with more than `max_keys`
    identities, and each identity is an API key the operator minted. Safe from several threads.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        name: str,
        max_keys: int = 10_000,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("a rate limit needs rate > 0, burst >= 1 and max_keys >= 1")
        self.rate = rate
        self.burst = burst
        self.name = name
        self.max_keys = max_keys
        self._now = now
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # key -> [tokens, at]
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> None:
        """Takes one call of `key`'s allowance, or raises ResourceExhausted naming the limit and when to retry."""
        now = self._now()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = [float(self.burst), now]
                self._buckets[key] = bucket
                if len(self._buckets) > self.max_keys:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
                bucket[0] = min(float(self.burst), bucket[0] + (now - bucket[1]) * self.rate)
                bucket[1] = now
            if bucket[0] >= 1.0:
                bucket[0] -= 1.0
                return
            wait = (1.0 - bucket[0]) / self.rate
        raise ResourceExhausted(
            f"rate limit {self.name} exceeded: {self.rate:g} calls/s per caller, bursts of {self.burst}; "
            f"retry in {wait:.3f}s",
            subject=self.name,
        )
