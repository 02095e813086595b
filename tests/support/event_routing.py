"""Parts of the events router, expirer and log tests: the events settings of fast tests, an asyncio client of the
Redis under test (standalone or cluster), outbox entries written as a producer writes them, endpoints stored by the
real EndpointStore, and readers of a tenant's log and queues."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from numprotect.core import event_keys
from numprotect.core.binding_records import BindingRecord, BindingRecordStore
from numprotect.core.clock import SystemClock
from numprotect.core.event_keys import TenantKeys
from numprotect.core.metrics import Metrics
from numprotect.core.redis_client import RedisClient, create_redis, redis_is_up
from numprotect.core.settings import Env, RedisSettings
from numprotect.services.events.endpoints import EndpointSpec, EndpointStore, StoredEndpoint
from numprotect.services.events.router import Router
from numprotect.services.events.settings import EventsSettings
from support.redis_state import plain

FAST_EVENTS = {
    "NUMPROTECT_EVENTS_RETRY_SCHEDULE": "200ms,400ms",
    "NUMPROTECT_EVENTS_POLL_INTERVAL": "50ms",
    "NUMPROTECT_EVENTS_EXPIRY_POLL": "100ms",
    "NUMPROTECT_EVENTS_SWEEP_INTERVAL": "1s",
    "NUMPROTECT_EVENTS_WATCH_BLOCK": "200ms",
    "NUMPROTECT_EVENTS_RETENTION": "2h",
}


def events_settings(**overrides: str) -> EventsSettings:
    return EventsSettings.from_env(Env({**FAST_EVENTS, **overrides}))


@asynccontextmanager
async def async_redis(redis_env: Mapping[str, str]) -> AsyncIterator[RedisClient]:
    """An asyncio client of the Redis under test (its slot map loaded, as `serve` does)."""
    client = create_redis(RedisSettings.from_env(Env(dict(redis_env))))
    try:
        await redis_is_up(client)
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def router_parts(
    redis_env: Mapping[str, str], **settings: str
) -> AsyncIterator[tuple[RedisClient, EndpointStore, Router, Metrics]]:
    """A client, the endpoint store and a router over it (not started: tests drive its rounds), its metrics."""
    async with async_redis(redis_env) as redis:
        config = events_settings(**settings)
        store = EndpointStore(redis, config, SystemClock())
        metrics = Metrics("events")
        yield redis, store, Router(redis, config, store, metrics, SystemClock()), metrics


async def add_endpoint(store: EndpointStore, tenant_id: str, event_types: Sequence[str] = ()) -> StoredEndpoint:
    spec = EndpointSpec(tenant_id, "https://receiver.example/hook", tuple(event_types), "", 1, 0)
    return await store.create(spec)


def add_entry(redis_sync: Any, slot: int, fields: Mapping[str, str | bytes], *, hint: bool = True) -> str:
    """An outbox entry in `slot` as a producer's script writes it, and (with `hint`) its ring hint."""
    entry_id = plain(redis_sync.xadd(event_keys.outbox_key(slot), dict(fields)))
    if hint:
        redis_sync.sadd(event_keys.ring_key(slot), slot)
    return str(entry_id)


def number_entry(tenant_id: str, number: str, at_ms: int, kind: str = event_keys.NUMBER_LOCKED) -> dict[str, str]:
    return {"ty": kind, "tn": tenant_id, "at": str(at_ms), "src": number, "n": "", "d": "carrier fault|op-1"}


def outbox_length(redis_sync: Any, slot: int) -> int:
    return int(redis_sync.xlen(event_keys.outbox_key(slot)))


def log_entries(redis_sync: Any, tenant_id: str) -> list[tuple[str, dict[str, str]]]:
    """The tenant's log: (entry id, fields as text), oldest first."""
    return [
        (plain(entry_id), {plain(k): plain(v) for k, v in fields.items()})
        for entry_id, fields in redis_sync.xrange(TenantKeys(tenant_id).log)
    ]


def queued(redis_sync: Any, tenant_id: str, endpoint_id: str) -> list[str]:
    """Log entry ids on an endpoint's queue, by due time."""
    return [plain(m) for m in redis_sync.zrange(TenantKeys(tenant_id).queue(endpoint_id), 0, -1)]


def sample(metrics: Metrics, name: str, labels: Mapping[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, dict(labels or {}))
    return 0.0 if value is None else value


async def committed_binding(redis: RedisClient, record: BindingRecord, *, request: str | None = None) -> None:
    """A binding record written and committed as binding writes it (binding.created in its slot's outbox, hinted;
    its expiry in the slot's expiry zset and ring)."""
    records = BindingRecordStore(redis)
    extra = {"rq": request} if request is not None else None
    assert await records.create(record, reservation_id="r-1", city_fallback=False, extra=extra)
    assert await records.activate(record.binding_id, record.end_ms(), expire_ms=record.expire_ms)
