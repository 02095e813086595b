"""The shared route table (routes_apply.lua): atomic, guarded writes on one virtual number's slot."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from numprotect.core.redis_client import RedisClient, create_redis
from numprotect.core.routes import (
    MODE_AXB,
    MODE_AXE,
    MODE_AXN,
    RESTRICTION_NONE,
    Route,
    RouteConflictError,
    RouteTable,
    axe_marker_key,
    axn_key,
    caller_key,
    extension_key,
)
from numprotect.core.settings import Env, RedisSettings

X = "700100000000001"
A = "13800000001"
B = "13900000002"


def _route(binding_id: str = "b1", mode: int = MODE_AXB, *, ttl_ms: int = 60_000, party_b: str = B) -> Route:
    return Route(
        binding_id=binding_id,
        tenant_id="t1",
        mode=mode,
        party_a=A,
        party_b=party_b,
        call_restriction=RESTRICTION_NONE,
        recording_enabled=True,
        allow_any_caller=False,
        expire_ms=int(time.time() * 1000) + ttl_ms,
    )


@pytest.fixture
async def redis(redis_env: dict[str, str]) -> AsyncIterator[RedisClient]:
    client = create_redis(RedisSettings.from_env(Env(redis_env)))
    yield client
    await client.aclose()


def test_route_values_round_trip() -> None:
    route = _route()
    assert Route.decode(route.encode()) == route
    assert route.encode().startswith("b1|")
    with pytest.raises(ValueError, match="route value"):
        Route.decode("garbage")


async def test_axb_put_writes_both_caller_keys_expiring_with_the_binding(redis: RedisClient, redis_sync: Any) -> None:
    route = _route()
    await RouteTable(redis).put(X, route)
    for caller in (A, B):
        assert Route.decode(redis_sync.get(caller_key(X, caller))) == route
        assert abs(redis_sync.pexpiretime(caller_key(X, caller)) - route.expire_ms) <= 1


async def test_expired_route_keys_disappear(redis: RedisClient, redis_sync: Any) -> None:
    # Warm both clients first (cluster topology discovery, script load) so the TTL is not spent on them.
    table = RouteTable(redis)
    await table.put(X, _route("warm-up"))
    await table.remove(X, _route("warm-up"))
    assert redis_sync.exists(caller_key(X, A)) == 0
    await table.put(X, _route(ttl_ms=400))
    assert redis_sync.exists(caller_key(X, A)) == 1
    await asyncio.sleep(0.6)
    assert redis_sync.exists(caller_key(X, A)) == 0


async def test_a_conflicting_put_writes_nothing(redis: RedisClient, redis_sync: Any) -> None:
    table = RouteTable(redis)
    await table.put(X, _route("b1"))
    other = replace(_route("b2"), party_b="13700000003")  # shares party A with b1 on the same X
    with pytest.raises(RouteConflictError) as info:
        await table.put(X, other)
    assert info.value.holder == "b1"
    assert redis_sync.exists(caller_key(X, "13700000003")) == 0
    assert Route.decode(redis_sync.get(caller_key(X, A))).binding_id == "b1"


async def test_remove_only_deletes_keys_still_holding_the_binding(redis: RedisClient, redis_sync: Any) -> None:
    table = RouteTable(redis)
    old = _route("b1", ttl_ms=100)
    await table.put(X, old)
    await asyncio.sleep(0.2)  # b1 expired; b2 now binds the same parties on X
    await table.put(X, _route("b2"))
    await table.remove(X, old)
    assert Route.decode(redis_sync.get(caller_key(X, A))).binding_id == "b2"
    await table.remove(X, _route("b2"))
    assert redis_sync.exists(caller_key(X, A), caller_key(X, B)) == 0


async def test_replacing_party_b_moves_the_key_atomically(redis: RedisClient, redis_sync: Any) -> None:
    table = RouteTable(redis)
    await table.put(X, _route())
    new_b = "13600000004"
    await table.put(X, _route(party_b=new_b), replaces=[caller_key(X, B)])
    assert redis_sync.exists(caller_key(X, B)) == 0
    assert Route.decode(redis_sync.get(caller_key(X, A))).party_b == new_b
    assert Route.decode(redis_sync.get(caller_key(X, new_b))).binding_id == "b1"


async def test_an_expiry_in_the_past_deletes_the_route(redis: RedisClient, redis_sync: Any) -> None:
    table = RouteTable(redis)
    await table.put(X, _route())
    await table.put(X, replace(_route(), expire_ms=int(time.time() * 1000) - 1))
    assert redis_sync.exists(caller_key(X, A), caller_key(X, B)) == 0


async def test_axn_and_axe_keys_and_the_axe_marker(redis: RedisClient, redis_sync: Any) -> None:
    table = RouteTable(redis)
    await table.put(X, _route("n1", MODE_AXN, party_b=""))
    assert Route.decode(redis_sync.get(axn_key(X))).binding_id == "n1"

    y = "700100000000002"
    long_lived = _route("e1", MODE_AXE, ttl_ms=120_000)
    short_lived = _route("e2", MODE_AXE, ttl_ms=30_000)
    await table.put(y, long_lived, "0001")
    await table.put(y, short_lived, "0002")
    assert Route.decode(redis_sync.get(extension_key(y, "0002"))).binding_id == "e2"
    # The marker lives as long as the longest AXE binding on the number; a shorter one does not cut it.
    assert abs(redis_sync.pexpiretime(axe_marker_key(y)) - long_lived.expire_ms) <= 1
    with pytest.raises(ValueError, match="extension"):
        await table.put(y, short_lived)
