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

`AioAdmission` and `PoolAdmission` bound the calls a whole process takes on (load shedding, used by the call layer
before anything else runs): past its capacity a server answers RESOURCE_EXHAUSTED at once, naming the limit, with
google.rpc.RetryInfo, instead of letting calls queue until their deadline (docs/operations.md "Overload").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent import futures
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

import grpc
from grpc_status import rpc_status
from prometheus_client import Counter

from numprotect.core.errors import (
    DEFAULT_RETRY_AFTER_SECONDS,
    DomainError,
    ResourceExhausted,
    Unavailable,
    to_rpc_status,
)
from numprotect.core.settings import RedisSettings, ServerSettings

log = logging.getLogger(__name__)
_P = ParamSpec("_P")
_T = TypeVar("_T")


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


# A queued call is refused at once when less than this is left of its deadline: it could not be served in time.
MIN_WAIT_SECONDS = 0.001
# How often, at most, the log says that load is being shed (one WARNING line with the counts, never one per call).
SHED_LOG_INTERVAL_SECONDS = 10.0


class Shedding:
    """The refusals of load shedding: one prebuilt status per reason (RESOURCE_EXHAUSTED naming the setting, with
    QuotaFailure and RetryInfo), so that refusing costs no more than sending it; their counts for the log, and
    numprotect_calls_shed_total{reason} when the process's counter is given (`shed`, labelled by reason)."""

    def __init__(self, settings: ServerSettings, *, in_progress: str, shed: Counter | None = None) -> None:
        queued = settings.max_queued_calls
        wait = settings.max_queue_wait_seconds
        reasons = {
            "queue_full": (
                "NUMPROTECT_MAX_QUEUED_CALLS",
                f"server over capacity: {in_progress} and {queued} calls waiting for a place "
                "(NUMPROTECT_MAX_QUEUED_CALLS); retry after the delay in RetryInfo",
            ),
            "queue_wait": (
                "NUMPROTECT_MAX_QUEUE_WAIT",
                f"server over capacity: no place within {wait:g}s (NUMPROTECT_MAX_QUEUE_WAIT) or half the call's "
                "deadline; retry after the delay in RetryInfo",
            ),
        }
        self.statuses: dict[str, grpc.Status] = {
            reason: rpc_status.to_status(
                to_rpc_status(ResourceExhausted(message, subject=subject, retry_after=DEFAULT_RETRY_AFTER_SECONDS))
            )
            for reason, (subject, message) in reasons.items()
        }
        self._counts = dict.fromkeys(self.statuses, 0)
        # Every reason's series from the start (0), so a fresh process exposes them.
        self._shed = {reason: shed.labels(reason) for reason in self.statuses} if shed is not None else {}
        self._logged_at = time.monotonic() - SHED_LOG_INTERVAL_SECONDS  # the first refusal is logged at once
        self._lock = threading.Lock()  # taken on refusals only

    def refuse(self, reason: str) -> grpc.Status:
        """The status to answer a refused call with; counts it and logs the counts now and then."""
        shed = self._shed.get(reason)
        if shed is not None:
            shed.inc()
        with self._lock:
            self._counts[reason] += 1
            now = time.monotonic()
            if now - self._logged_at < SHED_LOG_INTERVAL_SECONDS:
                return self.statuses[reason]
            counts, self._counts = self._counts, dict.fromkeys(self.statuses, 0)
            since, self._logged_at = self._logged_at, now
        log.warning(
            "load shed: calls refused RESOURCE_EXHAUSTED", extra={"since_seconds": round(now - since, 1), **counts}
        )
        return self.statuses[reason]


class AioAdmission:
    """The calls a grpc.aio process serves at once (`max_inflight_calls`), and a bounded, deadline-aware queue
    behind them; one per process, used from the event loop only (so a plain counter, no lock).

    A call finds a free place (the common case: one comparison and an increment), or waits in FIFO order for one
    at most `max_queue_wait_seconds` and half of what is left of its deadline, or is refused at once when
    `max_queued_calls` wait already or its deadline leaves no time to wait. A call leaving hands its place to the
    first waiter directly, so a waiter is never overtaken by a newcomer.
    """

    def __init__(self, settings: ServerSettings, *, shed: Counter | None = None) -> None:
        self.max_inflight = settings.max_inflight_calls
        self.max_queued = settings.max_queued_calls
        self.max_wait = settings.max_queue_wait_seconds
        self.shedding = Shedding(settings, in_progress=f"{self.max_inflight} calls in progress", shed=shed)
        self._inflight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def try_enter(self) -> bool:
        """Takes a free place when there is one and nobody waits for it."""
        if self._inflight < self.max_inflight and not self._waiters:
            self._inflight += 1
            return True
        return False

    def has_room(self) -> bool:
        """Whether a call that holds no place (a response stream) may start now."""
        return self._inflight < self.max_inflight or len(self._waiters) < self.max_queued

    async def wait(self, time_remaining: float | None) -> grpc.Status | None:
        """After `try_enter` failed: waits for a place (None: the call holds one now) or returns the refusal."""
        if len(self._waiters) >= self.max_queued:
            return self.shedding.refuse("queue_full")
        budget = self.max_wait if time_remaining is None else min(self.max_wait, time_remaining / 2)
        if budget < MIN_WAIT_SECONDS:
            return self.shedding.refuse("queue_wait")
        place: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(place)
        try:
            async with asyncio.timeout(budget):  # not wait_for (gh-86296)
                await place
            return None
        except BaseException as exc:
            if place.done() and not place.cancelled():
                self.leave()  # handed over just as the wait ended: pass it on
            else:
                place.cancel()
                with contextlib.suppress(ValueError):  # `leave` drops cancelled places it meets first
                    self._waiters.remove(place)
            if isinstance(exc, TimeoutError):
                return self.shedding.refuse("queue_wait")
            raise

    def leave(self) -> None:
        """Gives the place back: to the first waiter still waiting, else to the pool."""
        while self._waiters:
            place = self._waiters.popleft()
            if not place.done():
                place.set_result(None)
                return
        self._inflight -= 1


class AdmissionExecutor(futures.ThreadPoolExecutor):
    """The thread-pool server's executor, which knows its backlog: calls submitted and not started yet, and for the
    call a worker starts, how long it waited. Only deque appends and pops (atomic in CPython), no lock."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "") -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._submitted: deque[float] = deque()  # submit times, oldest first (the pool takes work FIFO)
        self._started = threading.local()

    @property
    def backlog(self) -> int:
        return len(self._submitted)

    def waited(self) -> float:
        """On a worker: how long the work it runs waited for a worker."""
        waited: float = getattr(self._started, "waited", 0.0)
        return waited

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> futures.Future[_T]:
        self._submitted.append(time.monotonic())
        try:
            return super().submit(self._start, fn, *args, **kwargs)  # type: ignore[arg-type]
        except BaseException:
            self._submitted.pop()
            raise

    def _start(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        try:
            submitted = self._submitted.popleft()
        except IndexError:  # only if appends and pops interleaved oddly: count it as not waited
            submitted = time.monotonic()
        self._started.waited = time.monotonic() - submitted
        return fn(*args, **kwargs)


class PoolAdmission:
    """Load shedding on grpcio's thread-pool server, where the workers are the calls served at once and the
    executor's queue is the wait.

    At arrival (grpcio's polling thread runs the call layer's interceptor) a call is refused when
    `max_queued_calls` already wait for a worker; the refusal runs on its own small pool (grpcio's
    `experimental_thread_pool`), so it is answered at once and not behind the queue. When a worker picks a call
    up it is refused if it waited longer than `max_queue_wait_seconds` or its deadline has (nearly) passed.
    """

    def __init__(
        self, settings: ServerSettings, executor: AdmissionExecutor, workers: int, *, shed: Counter | None = None
    ) -> None:
        # At least one: the backlog is read without knowing whether a worker is idle, and a call that finds one
        # counts in it for a moment.
        self.max_queued = max(1, settings.max_queued_calls)
        self.max_wait = settings.max_queue_wait_seconds
        self.executor = executor
        self.refusals = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="grpc-shed")
        self.shedding = Shedding(settings, in_progress=f"{workers} calls in progress", shed=shed)

    def queue_full(self) -> bool:
        return self.executor.backlog >= self.max_queued

    def late(self, context: Any) -> bool:
        """On the worker that starts a call: whether it must be refused now rather than served."""
        waited = self.executor.waited()
        if waited <= MIN_WAIT_SECONDS:
            return False  # a fresh call: its deadline is not worth reading
        if waited > self.max_wait:
            return True
        remaining: float | None = context.time_remaining()
        return remaining is not None and remaining < MIN_WAIT_SECONDS

    def close(self) -> None:
        self.refusals.shutdown(wait=False)
