"""The dispatcher: claims due deliveries, sends them signed, and settles what came of them (docs/events.md,
"Delivery").

Each round, for every tenant with enabled endpoints (np:ev:{tenants}; endpoints read at most once a second per
process), claim.lua takes the due work of endpoints whose ready score has come: per endpoint up to its concurrency
less its requests in flight, each request up to its batch size, never while the endpoint is paused; the events
go in flight under a lease (settings.lease_s). One round is one round trip (the tenants' claims pipelined). Each
request is signed (signing.py), POSTed (sender.py), then settled (settle.lua): a 2xx acknowledges it; any other
answer, or none, is a failed attempt: queued again after the retry schedule's next delay with +/- the jitter (and
not before the receiver's Retry-After), or a dead letter after the last attempt; a 429, a 5xx, a 3xx or no answer also
pauses the endpoint (for Retry-After, else for a backoff that doubles per consecutive failure and resets on a
success); a 410 disables the endpoint (EndpointStore.mark_gone; its queued work stays for when it is enabled
again). Every attempt is recorded in the endpoint's attempts stream.

Several dispatchers (processes) share the work: a claim is atomic, so each event is claimed by one. A dispatcher
that dies mid-request leaves its events in flight until their lease ends; the next claim then takes them again,
with the same event ids (at least once: the receiver may have had them). A settle that comes after its lease was
taken over records the attempt and changes nothing else.

The round repeats every poll interval, and sooner when a request ends (its slot is free) or when a claim says an
endpoint's next work is due (a retry's due time): retries go out on time, not a poll interval late.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from numprotect.core.clock import Clock
from numprotect.core.event_keys import TenantKeys
from numprotect.core.metrics import Metrics
from numprotect.core.periodic import Periodic, cancel_and_wait
from numprotect.core.redis_batch import Command, send_together
from numprotect.core.redis_client import KeyOrArg, LuaScript, RedisClient, as_text
from numprotect.core.telemetry.attributes import mask_numbers, set_attributes
from numprotect.services.events.endpoints import StoredEndpoint
from numprotect.services.events.router import ENDPOINT_CACHE_SECONDS, EndpointCache
from numprotect.services.events.sender import REQUESTS_IN_FLIGHT, SendResult, WebhookSender, retry_after_ms
from numprotect.services.events.settings import EventsSettings
from numprotect.services.events.signing import batch_body, message_id, signed_headers

log = logging.getLogger(__name__)

# The longest pause of an endpoint after consecutive 429/5xx answers with no Retry-After (the backoff starts at the
# retry schedule's first delay and doubles; never above the schedule's longest delay).
MAX_BACKOFF_MS = 300_000
# How often numprotect_webhook_queue_depth is counted again.
QUEUE_DEPTH_SECONDS = 5.0
# On shutdown, how long requests in flight may take to finish before they are cancelled (their leases then run
# out and another dispatcher sends them again).
DRAIN_SECONDS = 2.0
# Stored per attempt: an error longer than this is cut.
MAX_ERROR_CHARS = 300
# Settles sent in one pipeline at most (those that end while a batch is on its way wait for the next).
MAX_SETTLES_PER_BATCH = 256
# A batch of settles that failed (Redis unreachable for a moment) is sent once more after this; if it fails again
# its events stay in flight until their leases end and are sent again then (at least once).
SETTLE_RETRY_SECONDS = 0.2
# numprotect_webhook_delivery_seconds: 5 ms .. 2 min.
DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class EndpointSource(Protocol):
    """What the dispatcher needs of the endpoint store (endpoints.EndpointStore)."""

    async def tenants(self) -> list[str]: ...

    async def stored(self, tenant_id: str) -> list[StoredEndpoint]: ...

    async def get_stored(self, tenant_id: str, endpoint_id: str) -> StoredEndpoint | None: ...

    async def mark_gone(self, tenant_id: str, endpoint_id: str, reason: str, *, url: str | None = None) -> None: ...


class DeliveryCounts:
    """numprotect_webhook_deliveries_total{outcome}, numprotect_webhook_delivery_seconds,
    numprotect_webhook_dead_letters_total, numprotect_webhook_queue_depth and
    numprotect_webhook_endpoints_gone_total."""

    def __init__(self, metrics: Metrics) -> None:
        requests = metrics.counter(
            "numprotect_webhook_deliveries",
            "Webhook requests sent, by outcome (success: a 2xx answer; failure: any other answer, or none)",
            ("outcome",),
        )
        self.succeeded, self.failed = requests.labels("success"), requests.labels("failure")
        self.seconds = metrics.histogram(
            "numprotect_webhook_delivery_seconds",
            "Seconds from a webhook request's start to its answer (or its failure)",
            buckets=DELIVERY_BUCKETS,
        )
        self.dead = metrics.counter(
            "numprotect_webhook_dead_letters",
            "Events that will not be delivered: dead letters (every attempt failed), and queued events whose log"
            " entry the retention removed before their next attempt",
        )
        self.queue_depth = metrics.gauge(
            "numprotect_webhook_queue_depth",
            "Events queued or in flight over all endpoints (counted every few seconds by each events process)",
        )
        self.gone = metrics.counter(
            "numprotect_webhook_endpoints_gone", "Endpoints disabled because their receiver answered 410 Gone"
        )


@dataclass(frozen=True, slots=True)
class ClaimedEvent:
    log_id: str
    event_id: str
    event_type: str
    payload: bytes
    # 1 for the first attempt.
    attempt: int


@dataclass(frozen=True, slots=True)
class ClaimedRequest:
    """One request's events, in flight at this dispatcher until `lease_end` (ms)."""

    endpoint: StoredEndpoint
    lease_end: int
    events: tuple[ClaimedEvent, ...]


@dataclass(frozen=True, slots=True)
class Settled:
    """What settle.lua did: events still under the request's lease (settled), events dead now."""

    settled: int
    dead: int


class _EnabledEndpoints:
    """Every tenant's enabled endpoints: the tenants read at most once per ENDPOINT_CACHE_SECONDS, each tenant's
    endpoints through the router's EndpointCache (as fresh); an endpoint this process saw answer 410 is left out
    until the cache has read it again (disabled by then)."""

    def __init__(self, source: EndpointSource) -> None:
        self.source = source
        self.endpoints = EndpointCache(source)
        self._tenants: tuple[float, list[str]] = (0.0, [])
        self._gone: dict[str, float] = {}  # endpoint id -> until when it is left out

    async def of_tenants(self) -> dict[str, list[StoredEndpoint]]:
        """Tenants with enabled endpoints, and those endpoints."""
        now = time.monotonic()
        if self._tenants[0] <= now:
            self._tenants = (now + ENDPOINT_CACHE_SECONDS, await self.source.tenants())
        self._gone = {ep: until for ep, until in self._gone.items() if until > now}
        enabled = {
            tenant_id: [e for e in endpoints if e.enabled and e.endpoint_id not in self._gone]
            for tenant_id, endpoints in (await self.endpoints.of(self._tenants[1])).items()
        }
        return {tenant_id: endpoints for tenant_id, endpoints in enabled.items() if endpoints}

    def gone(self, endpoint_id: str) -> None:
        self._gone[endpoint_id] = time.monotonic() + ENDPOINT_CACHE_SECONDS


class _SettleBatches:
    """Settles sent together: those that come while a batch is on its way go in the next one (one pipeline), so the
    dispatcher holds one Redis connection for them however many requests end at once, and pays one round trip per
    batch, not per request."""

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis
        self._waiting: list[tuple[Command, asyncio.Future[Any]]] = []
        self._sending: asyncio.Task[None] | None = None

    async def run(self, command: Command) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((command, future))
        if self._sending is None:
            self._sending = loop.create_task(self._send(), name="webhook settles")
        return await future

    async def _send(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[:MAX_SETTLES_PER_BATCH]
                del self._waiting[:MAX_SETTLES_PER_BATCH]
                replies = await self._replies([command for command, _ in batch])
                for (_, future), reply in zip(batch, replies, strict=True):
                    if future.done():  # its delivery was cancelled
                        continue
                    if isinstance(reply, Exception):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
        finally:
            self._sending = None
            for _, future in self._waiting:  # cancelled (shutdown) with settles waiting: they end too
                future.cancel()
            self._waiting.clear()

    async def _replies(self, commands: Sequence[Command]) -> list[Any]:
        try:
            return await send_together(self.redis, commands)
        except Exception:
            await asyncio.sleep(SETTLE_RETRY_SECONDS)
        try:
            return await send_together(self.redis, commands)
        except Exception as exc:
            return [exc] * len(commands)


def budgets(free: int, tenants: int) -> list[int]:
    """Requests each of `tenants` tenants (in this round's order) may claim when `free` requests may start: shared
    as evenly as whole requests allow; the tenants beyond `free` get none this round."""
    share, extra = divmod(free, tenants)
    return [share + (1 if i < extra else 0) for i in range(tenants)]


class Dispatcher:
    _claim_script = LuaScript.beside(__file__, "claim.lua")
    _settle_script = LuaScript.beside(__file__, "settle.lua")

    def __init__(
        self,
        redis: RedisClient,
        settings: EventsSettings,
        endpoints: EndpointSource,
        metrics: Metrics,
        clock: Clock,
        sender: WebhookSender,
        *,
        requests_in_flight: int = REQUESTS_IN_FLIGHT,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.redis = redis
        # A CLIENT span per request ("webhook POST"), a root span (sampled as the process's sampler says).
        self.tracer = tracer if tracer is not None else trace.NoOpTracer()
        # Requests this dispatcher has in flight at most (claims take no more).
        self.requests_in_flight = requests_in_flight
        self.settings = settings
        self.endpoints = endpoints
        self.counts = DeliveryCounts(metrics)
        self.clock = clock
        self.sender = sender
        self.lease_ms = int(settings.lease_s * 1000)
        self.retention_ms = int(settings.retention_s * 1000)
        delays = [int(delay * 1000) for delay in settings.retry_schedule]
        self.first_backoff_ms = delays[0]
        self.max_backoff_ms = max(delays[0], min(max(delays), MAX_BACKOFF_MS))
        self._endpoints = _EnabledEndpoints(endpoints)
        self._settles = _SettleBatches(redis)
        self._random = random.Random(secrets.randbits(64))
        self._rotation = 0
        self._in_flight: set[asyncio.Task[Settled]] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._depth = Periodic("webhook queue depth", self.refresh_queue_depth, QUEUE_DEPTH_SECONDS)

    # --- the loop ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="webhook dispatcher")
        self._depth.start()

    async def close(self) -> None:
        """Stops claiming, lets requests in flight finish for up to DRAIN_SECONDS, cancels the rest (every wait
        bounded: a cancellation swallowed inside a client, gh-86296, must not hold shutdown up)."""
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait({task}, "webhook dispatcher")
        await self._depth.stop()
        if self._in_flight:
            _, pending = await asyncio.wait(set(self._in_flight), timeout=DRAIN_SECONDS)
            if pending:
                await cancel_and_wait(pending, "webhook delivery")

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            wait = self.settings.poll_interval_s
            try:
                if self.in_flight_requests < self.requests_in_flight:
                    requests, next_in = await self.claim(self.requests_in_flight - self.in_flight_requests)
                    for request in requests:
                        self._start(request)
                    if next_in is not None:
                        wait = min(wait, next_in)
            except Exception as exc:
                log.warning("webhook claim round failed", extra={"error": repr(exc)})
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()

    @property
    def in_flight_requests(self) -> int:
        return len(self._in_flight)

    def _start(self, request: ClaimedRequest) -> None:
        task = asyncio.get_running_loop().create_task(self.deliver(request), name="webhook delivery")
        self._in_flight.add(task)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[Settled]) -> None:
        self._in_flight.discard(task)
        self._wake.set()  # a request slot is free, and the endpoint may have work due again
        if not task.cancelled() and task.exception() is not None:
            log.warning("webhook delivery failed", extra={"error": repr(task.exception())})

    # --- claim ------------------------------------------------------------------------------------

    async def claim(self, free: int) -> tuple[list[ClaimedRequest], float | None]:
        """One round's claims (at most `free` requests in all); and in how many seconds an endpoint looked at has
        work due next (None: none has any)."""
        enabled = await self._endpoints.of_tenants()
        if not enabled or free <= 0:
            return [], None
        tenants = list(enabled)
        self._rotation = (self._rotation + 1) % len(tenants)
        tenants = (tenants[self._rotation :] + tenants[: self._rotation])[:free]
        commands: list[Command] = []
        for tenant_id, budget in zip(tenants, budgets(free, len(tenants)), strict=True):
            commands.append(self._claim_command(tenant_id, enabled[tenant_id], budget))
        replies = await send_together(self.redis, commands)
        requests: list[ClaimedRequest] = []
        next_in: float | None = None
        for tenant_id, reply in zip(tenants, replies, strict=True):
            if isinstance(reply, Exception):
                log.warning("webhook claim failed", extra={"tenant_id": tenant_id, "error": repr(reply)})
                continue
            now_ms, next_ms, dead, dropped, claimed = reply
            if dead:
                self.counts.dead.inc(dead)
            if dropped:
                # Undeliverable for good (their bodies are gone; nothing to redrive): counted with the dead letters,
                # so the dead-letter alert fires.
                self.counts.dead.inc(dropped)
                log.warning(
                    "queued events no longer in the log (older than the retention) dropped",
                    extra={"tenant_id": tenant_id, "events": dropped},
                )
            if next_ms >= 0:
                due_in = max(0.0, (next_ms - now_ms) / 1000)
                next_in = due_in if next_in is None else min(next_in, due_in)
            by_id = {e.endpoint_id: e for e in enabled[tenant_id]}
            requests.extend(_requests(by_id, claimed))
        return requests, next_in

    def _claim_command(self, tenant_id: str, endpoints: Sequence[StoredEndpoint], budget: int) -> Command:
        keys = TenantKeys(tenant_id)
        names: list[KeyOrArg] = [keys.ready, keys.log]
        args: list[KeyOrArg] = [self.lease_ms, budget, self.settings.attempts]
        start = self._rotation % len(endpoints)
        for endpoint in [*endpoints[start:], *endpoints[:start]]:
            ep = endpoint.endpoint_id
            names += [
                keys.queue(ep),
                keys.in_flight(ep),
                keys.attempts(ep),
                keys.state(ep),
                keys.dead(ep),
                keys.dead_errors(ep),
            ]
            concurrency = min(
                endpoint.concurrency(self.settings.endpoint_concurrency), self.settings.max_endpoint_concurrency
            )
            args += [ep, concurrency, min(endpoint.batch_size, self.settings.max_batch_size)]
        return Command.run(self._claim_script, names, args)

    # --- deliver ----------------------------------------------------------------------------------

    async def deliver(self, request: ClaimedRequest) -> Settled:
        """Sends one claimed request and settles it, in a "webhook POST" CLIENT span (request_span_attributes;
        ERROR with the attempt's error when no 2xx came)."""
        endpoint = request.endpoint
        events = request.events
        with self.tracer.start_as_current_span(
            "webhook POST", kind=SpanKind.CLIENT, attributes=request_span_attributes(request)
        ) as span:
            sent_ms = self.clock.now_ms()
            batched = endpoint.batch_size > 1
            body = batch_body([e.payload for e in events]) if batched else events[0].payload
            webhook_id = message_id([e.event_id for e in events], batched=batched)
            headers = signed_headers(endpoint.signing_secrets(sent_ms), webhook_id, sent_ms // 1000, body)
            result = await self.sender.send(endpoint.url, body, headers)
            (self.counts.succeeded if result.succeeded else self.counts.failed).inc()
            self.counts.seconds.observe(result.latency_s)
            settled = await self.settle(request, result, sent_ms)
            if settled.dead:
                self.counts.dead.inc(settled.dead)
            if result.status == 410:
                await self._gone(endpoint)
            if span.is_recording():
                _record_outcome(span, result, settled)
            return settled

    async def settle(self, request: ClaimedRequest, result: SendResult, sent_ms: int) -> Settled:
        endpoint = request.endpoint
        keys = TenantKeys(endpoint.tenant_id)
        ep = endpoint.endpoint_id
        status = result.status
        if result.succeeded:
            outcome = "ok"
        elif status == 429 or status >= 500 or 300 <= status < 400 or (status == 0 and not result.refused):
            # The receiver is overloaded, down, or redirects (moved or misconfigured; never followed): the endpoint
            # pauses, so it is not sent a request per due event.
            outcome = "slow"
        else:
            outcome = "fail"
        retry_after = retry_after_ms(result.retry_after, self.clock.now_ms())
        args: list[KeyOrArg] = [
            ep,
            request.lease_end,
            outcome,
            status,
            int(result.latency_s * 1_000_000),
            result.error[:MAX_ERROR_CHARS],
            -1 if retry_after is None else retry_after,
            self.first_backoff_ms,
            self.max_backoff_ms,
            self.retention_ms,
            self.settings.attempts,
            sent_ms,
        ]
        for event in request.events:
            args += [event.log_id, event.event_id, event.event_type, event.attempt, self.delay_ms(event.attempt)]
        names = [
            keys.endpoints,
            keys.ready,
            keys.queue(ep),
            keys.in_flight(ep),
            keys.attempts(ep),
            keys.dead(ep),
            keys.dead_errors(ep),
            keys.deliveries(ep),
            keys.state(ep),
        ]
        settled, dead, _, _ = await self._settles.run(Command.run(self._settle_script, names, args))
        return Settled(int(settled), int(dead))

    def delay_ms(self, attempt: int) -> int:
        """Before the attempt after `attempt`: the schedule's delay, +/- the jitter (0 after the last attempt)."""
        if attempt >= self.settings.attempts:
            return 0
        jitter = self.settings.retry_jitter
        return int(self.settings.retry_schedule[attempt - 1] * 1000 * (1 + self._random.uniform(-jitter, jitter)))

    async def _gone(self, endpoint: StoredEndpoint) -> None:
        """The receiver answered 410: the endpoint is disabled (counted once, by the request that disabled it,
        unless several answer 410 at the same moment), unless it points at another URL by now (moved to a new
        receiver while this request was on its way to the old one)."""
        current = await self.endpoints.get_stored(endpoint.tenant_id, endpoint.endpoint_id)
        if current is not None and current.url != endpoint.url:
            return
        self._endpoints.gone(endpoint.endpoint_id)
        if current is None or not current.enabled:
            return
        await self.endpoints.mark_gone(
            endpoint.tenant_id, endpoint.endpoint_id, "the receiver answered 410 Gone", url=endpoint.url
        )
        self.counts.gone.inc()
        log.info(
            "webhook endpoint disabled: its receiver answered 410 Gone",
            extra={"tenant_id": endpoint.tenant_id, "endpoint_id": endpoint.endpoint_id},
        )

    # --- queue depth ------------------------------------------------------------------------------

    async def refresh_queue_depth(self) -> int:
        """numprotect_webhook_queue_depth: events queued or in flight over every endpoint of every tenant."""
        tenants = await self.endpoints.tenants()
        stored = await asyncio.gather(*(self.endpoints.stored(t) for t in tenants))
        commands = []
        for endpoints in stored:
            for endpoint in endpoints:
                keys = TenantKeys(endpoint.tenant_id)
                commands.append(Command.of("ZCARD", keys.queue(endpoint.endpoint_id)))
                commands.append(Command.of("ZCARD", keys.in_flight(endpoint.endpoint_id)))
        depth = 0
        if commands:
            depth = sum(int(reply) for reply in await send_together(self.redis, commands) if isinstance(reply, int))
        self.counts.queue_depth.set(depth)
        return depth


def request_span_attributes(request: ClaimedRequest) -> dict[str, Any]:
    """A request's span attributes: which endpoint, tenant and events, the receiver's host (never the URL's path or
    query, which may carry a receiver's token, nor the secret; phone numbers masked by set_attributes' rule)."""
    endpoint = request.endpoint
    target = urlsplit(endpoint.url)
    attributes: dict[str, Any] = {
        "http.request.method": "POST",
        "url.scheme": target.scheme,
        "server.address": target.hostname or "",
        "numprotect.tenant_id": endpoint.tenant_id,
        "numprotect.endpoint_id": endpoint.endpoint_id,
        "numprotect.event_count": len(request.events),
        "numprotect.event_id": request.events[0].event_id,
        "numprotect.event_type": request.events[0].event_type,
        "numprotect.attempt": max(e.attempt for e in request.events),
    }
    if target.port is not None:
        attributes["server.port"] = target.port
    return {name: mask_numbers(value) if isinstance(value, str) else value for name, value in attributes.items()}


def _record_outcome(span: trace.Span, result: SendResult, settled: Settled) -> None:
    """success (a 2xx), gone (410: the endpoint is disabled), dead (the last attempt failed), retry (queued again)."""
    if result.succeeded:
        outcome = "success"
    elif result.status == 410:
        outcome = "gone"
    elif settled.dead:
        outcome = "dead"
    else:
        outcome = "retry"
    attributes: dict[str, Any] = {"numprotect.outcome": outcome, "numprotect.dead": settled.dead}
    if result.status:
        attributes["http.response.status_code"] = result.status
    set_attributes(span, attributes)
    if not result.succeeded:
        span.set_status(Status(StatusCode.ERROR, mask_numbers(result.error or f"HTTP {result.status}")))


def _requests(by_id: dict[str, StoredEndpoint], claimed: Any) -> list[ClaimedRequest]:
    requests = []
    for endpoint_id, lease_end, events in claimed:
        endpoint = by_id[as_text(endpoint_id)]
        requests.append(
            ClaimedRequest(
                endpoint,
                int(lease_end),
                tuple(
                    ClaimedEvent(as_text(log_id), as_text(event_id), as_text(event_type), _bytes(payload), int(attempt))
                    for log_id, event_id, event_type, payload, attempt in events
                ),
            )
        )
    return requests


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()
