"""Deliveries under test: real Redis (either mode), the real EndpointStore, real dispatchers and senders in the
test's process, and events put where the router puts them (the tenant's log, then the enqueue step of events18 /
docs/events.md: attempts 0, queue due now, ready lowered), so delivery is tested apart from routing."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from numprotect.core.clock import SystemClock
from numprotect.core.event_keys import TENANTS_KEY, TenantKeys, event_id
from numprotect.core.metrics import Metrics
from numprotect.core.redis_client import create_redis
from numprotect.core.settings import Env, RedisSettings
from numprotect.services.events.deliveries import Deliveries
from numprotect.services.events.dispatcher import Dispatcher
from numprotect.services.events.endpoints import EndpointSpec, EndpointStore, StoredEndpoint
from numprotect.services.events.sender import REQUESTS_IN_FLIGHT, WebhookSender
from numprotect.services.events.settings import EventsSettings

TENANT = "t1"
# Loopback receivers over http, a short retry schedule, quick polls: deliveries in milliseconds.
FAST = {
    "NUMPROTECT_EVENTS_ALLOW_HTTP": "on",
    "NUMPROTECT_EVENTS_ALLOWED_NETWORKS": "127.0.0.0/8",
    "NUMPROTECT_EVENTS_RETRY_SCHEDULE": "200ms,400ms,600ms",
    "NUMPROTECT_EVENTS_RETRY_JITTER": "0.2",
    "NUMPROTECT_EVENTS_POLL_INTERVAL": "50ms",
    "NUMPROTECT_EVENTS_REQUEST_TIMEOUT": "2s",
    "NUMPROTECT_EVENTS_RETENTION": "2h",
}


def payload(event: str, event_type: str, at_ms: int, data: Mapping[str, Any]) -> bytes:
    """A single event's body as the router renders it (compact JSON: id, type, timestamp, data)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at_ms / 1000)) + f".{at_ms % 1000:03d}Z"
    body = {"id": event, "type": event_type, "timestamp": stamp, "data": dict(data)}
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass
class Published:
    event_id: str
    log_id: str
    body: bytes


@dataclass
class DeliveryRig:
    redis: Any  # a RedisClient (Any: redis-py's own annotations of its asyncio replies are loose)
    settings: EventsSettings
    environ: dict[str, str]
    endpoints: EndpointStore
    deliveries: Deliveries
    metrics: list[Metrics] = field(default_factory=list)
    _running: list[tuple[Dispatcher, WebhookSender]] = field(default_factory=list)
    _published: int = 0

    async def endpoint(
        self,
        url: str,
        *,
        tenant_id: str = TENANT,
        batch_size: int = 0,
        max_concurrency: int = 0,
        event_types: Sequence[str] = (),
    ) -> StoredEndpoint:
        return await self.endpoints.create(
            EndpointSpec(tenant_id, url, tuple(event_types), "test receiver", batch_size, max_concurrency)
        )

    async def publish(
        self, endpoints: Sequence[StoredEndpoint], event_type: str = "binding.created", **data: Any
    ) -> Published:
        """Logs one new event of the endpoints' tenant and queues it for each endpoint, as route.lua does."""
        tenant_id = endpoints[0].tenant_id
        keys = TenantKeys(tenant_id)
        self._published += 1
        at_ms = int(time.time() * 1000)
        event = event_id(event_type, f"test-{id(self)}-{self._published}", "")
        body = payload(event, event_type, at_ms, {"n": self._published, **data})
        log_id = await self.redis.xadd(keys.log, {"id": event, "ty": event_type, "at": at_ms, "p": body})
        log_id = log_id.decode() if isinstance(log_id, bytes) else log_id
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(keys.seen(event), log_id)
            for endpoint in endpoints:
                ep = endpoint.endpoint_id
                pipe.hset(keys.attempts(ep), log_id, 0)
                pipe.zadd(keys.queue(ep), {log_id: at_ms}, nx=True)
                pipe.zadd(keys.ready, {ep: at_ms}, lt=True)
            await pipe.execute()
        return Published(event, log_id, body)

    def dispatcher(self, *, start: bool = True, requests_in_flight: int | None = None, **settings: str) -> Dispatcher:
        """A dispatcher (its own sender and metrics), started unless `start` is False; closed at the rig's end."""
        own = EventsSettings.from_env(Env({**self.environ, **settings})) if settings else self.settings
        sender = WebhookSender(own)
        metrics = Metrics("events")
        self.metrics.append(metrics)
        bound = REQUESTS_IN_FLIGHT if requests_in_flight is None else requests_in_flight
        dispatcher = Dispatcher(
            self.redis, own, self.endpoints, metrics, SystemClock(), sender, requests_in_flight=bound
        )
        self._running.append((dispatcher, sender))
        if start:
            dispatcher.start()
        return dispatcher

    async def stop(self, dispatcher: Dispatcher) -> None:
        for running in [r for r in self._running if r[0] is dispatcher]:
            self._running.remove(running)
            await running[0].close()
            await running[1].close()

    async def close(self) -> None:
        for dispatcher, sender in self._running:
            await dispatcher.close()
            await sender.close()
        self._running.clear()

    async def tenants(self) -> set[str]:
        return {m.decode() for m in await self.redis.smembers(TENANTS_KEY)}


def metric(metrics: Metrics, name: str, labels: Mapping[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, dict(labels or {}))
    return 0.0 if value is None else value


@asynccontextmanager
async def delivery_rig(redis_env: Mapping[str, str], **settings: str) -> AsyncIterator[DeliveryRig]:
    environ = {**redis_env, **FAST, **settings}
    redis = create_redis(RedisSettings.from_env(Env(environ)))
    events_settings = EventsSettings.from_env(Env(environ))
    clock = SystemClock()
    rig = DeliveryRig(
        redis,
        events_settings,
        environ,
        EndpointStore(redis, events_settings, clock),
        Deliveries(redis, events_settings, clock),
    )
    try:
        yield rig
    finally:
        await rig.close()
        await redis.aclose()
