"""The endpoint scripts (endpoint_create.lua, endpoint_swap.lua, endpoint_delete.lua) on their own, and run twice as
a cluster client re-sends a script whose reply it lost (docs/redis-schema.md, "Scripts run twice"): a repeat
changes nothing and answers what the first run answered."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from numprotect.core.clock import SystemClock
from numprotect.core.event_keys import TenantKeys
from numprotect.core.redis_client import RedisClient, create_redis
from numprotect.core.settings import Env, RedisSettings
from numprotect.events.v1 import events_pb2 as pb
from numprotect.services.events.endpoints import (
    EndpointSpec,
    EndpointStore,
    StoredEndpoint,
)
from numprotect.services.events.settings import EventsSettings

TENANT = "t-scripts"
KEYS = TenantKeys(TENANT)


def snapshot(redis_sync: Any) -> dict[bytes, Any]:
    """Every key of the tenant's endpoints and deliveries, with its contents (the stored endpoints are bytes)."""
    out: dict[bytes, Any] = {}
    for key in redis_sync.scan_iter(match="np:ev:{ev:t:" + TENANT + "}*", count=1000):
        kind = redis_sync.type(key)
        if kind == b"hash":
            out[key] = redis_sync.hgetall(key)
        elif kind == b"zset":
            out[key] = redis_sync.zrange(key, 0, -1, withscores=True)
        else:
            out[key] = kind
    return out


async def run_twice(redis_sync: Any, call: Callable[[], Awaitable[Any]]) -> tuple[Any, Any]:
    """Both answers of `call` made twice; asserts the second changed nothing."""
    first = await call()
    after_first = snapshot(redis_sync)
    second = await call()
    assert snapshot(redis_sync) == after_first
    return first, second


@pytest.fixture
async def store(redis_env: dict[str, str]) -> AsyncIterator[EndpointStore]:
    client = create_redis(RedisSettings.from_env(Env(redis_env)))
    settings = EventsSettings.from_env(Env({"NUMPROTECT_EVENTS_MAX_ENDPOINTS_PER_TENANT": "2"}))
    yield EndpointStore(client, settings, SystemClock())
    await client.aclose()


def spec(url: str = "https://a.example/h") -> EndpointSpec:
    return EndpointSpec(TENANT, url, (), "", 0, 0)


def stored_endpoint(endpoint_id: str, url: str = "https://a.example/h") -> StoredEndpoint:
    return StoredEndpoint(pb.Endpoint(tenant_id=TENANT, endpoint_id=endpoint_id, url=url), "whsec_AAAA")


async def test_create_twice_stores_once_and_answers_stored_both_times(store: EndpointStore, redis_sync: Any) -> None:
    redis: RedisClient = store.redis
    endpoint = stored_endpoint("ep_" + "a" * 26)

    async def create() -> Any:
        return await store._create(redis, [KEYS.endpoints], [endpoint.endpoint_id, endpoint.to_bytes(), 2])

    assert await run_twice(redis_sync, create) == (1, 1)
    other = stored_endpoint("ep_" + "a" * 26, url="https://b.example/")
    taken = await store._create(redis, [KEYS.endpoints], [other.endpoint_id, other.to_bytes(), 2])
    assert taken == -1  # another endpoint's id: the caller draws again
    second = stored_endpoint("ep_" + "b" * 26)
    assert await store._create(redis, [KEYS.endpoints], [second.endpoint_id, second.to_bytes(), 2]) == 1
    third = stored_endpoint("ep_" + "c" * 26)
    assert await store._create(redis, [KEYS.endpoints], [third.endpoint_id, third.to_bytes(), 2]) == 0
    assert redis_sync.hlen(KEYS.endpoints) == 2


async def test_swap_twice_applies_once_and_a_stale_read_loses(store: EndpointStore, redis_sync: Any) -> None:
    created = await store.create(spec())
    ep = created.endpoint_id
    before = created.to_bytes()
    after = created.changed(lambda e: setattr(e, "url", "https://b.example/h"), 1).to_bytes()
    redis_sync.hset(KEYS.state(ep), mapping={"pause": 10**13, "fails": 3})

    async def swap() -> Any:
        return await store._swap(
            store.redis, [KEYS.endpoints, KEYS.ready, KEYS.state(ep)], [ep, before, after, "1", 1000]
        )

    assert await run_twice(redis_sync, swap) == (1, 1)
    assert not redis_sync.exists(KEYS.state(ep))
    assert redis_sync.zscore(KEYS.ready, ep) == 1000
    assert redis_sync.hget(KEYS.endpoints, ep) == after
    # A change computed from what was read before: refused (0), nothing written.
    stale = created.changed(lambda e: setattr(e, "description", "lost"), 2).to_bytes()
    keys = [KEYS.endpoints, KEYS.ready, KEYS.state(ep)]
    assert await store._swap(store.redis, keys, [ep, before, stale, "0", 2000]) == 0
    assert redis_sync.hget(KEYS.endpoints, ep) == after
    # ZADD LT: a ready time already earlier stays.
    assert await store._swap(store.redis, keys, [ep, after, before, "1", 5000]) == 1
    assert redis_sync.zscore(KEYS.ready, ep) == 1000
    assert await store._swap(store.redis, keys, [ep + "x", before, after, "0", 1]) == -1


async def test_concurrent_changes_are_all_applied(store: EndpointStore) -> None:
    created = await store.create(spec())

    def adding(event_type: str) -> Any:
        def change(stored: StoredEndpoint) -> tuple[StoredEndpoint, bool]:
            return stored.changed(lambda e: e.event_types.append(event_type), 1), False

        return change

    types = ["binding.created", "binding.updated", "binding.deleted", "cdr.created"]
    await asyncio.gather(*(store.change(TENANT, created.endpoint_id, adding(t)) for t in types))
    stored = await store.get_stored(TENANT, created.endpoint_id)
    assert stored is not None and sorted(stored.endpoint.event_types) == sorted(types)


async def test_delete_twice_removes_once(store: EndpointStore, redis_sync: Any) -> None:
    created = await store.create(spec())
    ep = created.endpoint_id
    redis_sync.zadd(KEYS.queue(ep), {"1-0": 5})
    redis_sync.zadd(KEYS.ready, {ep: 5})
    keys = [KEYS.endpoints, KEYS.ready, *KEYS.endpoint_keys(ep)]

    async def delete() -> Any:
        return await store._delete(store.redis, keys, [ep])

    assert await run_twice(redis_sync, delete) == (1, 0)
    assert redis_sync.hlen(KEYS.endpoints) == 0 and not redis_sync.exists(KEYS.queue(ep), KEYS.ready)


def test_the_stored_form_keeps_both_secrets_and_answers_carry_none() -> None:
    endpoint = StoredEndpoint(
        pb.Endpoint(tenant_id=TENANT, endpoint_id="ep_" + "d" * 26), "whsec_new", "whsec_old", 5000
    )
    again = StoredEndpoint.from_bytes(endpoint.to_bytes())
    assert again == endpoint
    assert again.signing_secrets(4999) == ["whsec_new", "whsec_old"]
    assert again.signing_secrets(5000) == ["whsec_new"]
    assert again.public(4999).secret == "" and again.public(4999).previous_secret_expire_time.ToMilliseconds() == 5000
    assert not again.public(5000).HasField("previous_secret_expire_time")
    assert again.public(0, with_secret=True).secret == "whsec_new"
    assert again.endpoint.secret == ""  # the stored endpoint never carries its secrets in `endpoint`
