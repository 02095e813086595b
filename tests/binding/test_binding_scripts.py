"""The binding service's own Redis keys: its Lua scripts (one test each) and the tenant index."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from numprotect.core.errors import Aborted
from numprotect.core.redis_client import RedisClient, create_redis
from numprotect.core.settings import Env, RedisSettings
from numprotect.services.binding.store import (
    MutationLocks,
    OrderClaims,
    TenantIndex,
    mutation_lock_key,
    new_binding_id,
    order_key,
    tenant_index_key,
    tenant_shard,
)

DAY = 86_400_000


@pytest.fixture
async def redis(redis_env: dict[str, str]) -> AsyncIterator[RedisClient]:
    client = create_redis(RedisSettings.from_env(Env(redis_env)))
    yield client
    await client.aclose()


def _now() -> int:
    return time.time_ns() // 1_000_000


async def test_order_claim_script_outcomes(redis: RedisClient, redis_sync: Any) -> None:
    """order_claim.lua: claimed, busy (same parties), conflict (other parties), stale then taken (deadline passed,
    after cleaning up), done."""
    orders = OrderClaims(redis)
    now = _now()
    expire_at = now + DAY
    first = await orders.claim("t1", "o1", "b-one", "fp1", now + 60_000, expire_at)
    assert (first.outcome, first.binding_id) == ("claimed", "b-one")
    assert abs(redis_sync.pexpiretime(order_key("t1", "o1")) - expire_at) <= 1
    busy = await orders.claim("t1", "o1", "b-two", "fp1", now + 60_000, expire_at)
    assert (busy.outcome, busy.binding_id) == ("busy", "b-one")
    conflict = await orders.claim("t1", "o1", "b-two", "fp2", now + 60_000, expire_at)
    assert (conflict.outcome, conflict.binding_id) == ("conflict", "b-one")

    await orders.claim("t1", "o2", "b-old", "fp1", now - 1, expire_at)  # its deadline has passed
    stale = await orders.claim("t1", "o2", "b-new", "fp1", now + 60_000, expire_at)
    assert (stale.outcome, stale.binding_id) == ("stale", "b-old")
    assert redis_sync.get(order_key("t1", "o2")).decode().startswith("p|b-old|")  # untouched until cleaned
    wrong = await orders.claim("t1", "o2", "b-new", "fp1", now + 60_000, expire_at, cleaned="b-other")
    assert wrong.outcome == "stale"
    taken = await orders.claim("t1", "o2", "b-new", "fp1", now + 60_000, expire_at, cleaned="b-old")
    assert (taken.outcome, taken.binding_id) == ("taken", "b-old")
    assert redis_sync.get(order_key("t1", "o2")).decode().startswith("p|b-new|")

    assert await orders.commit("t1", "o1", "b-one", "fp1", now + 60_000, expire_at)
    done = await orders.claim("t1", "o1", "b-three", "fp1", now + 60_000, expire_at)
    assert (done.outcome, done.binding_id) == ("done", "b-one")
    assert (await orders.claim("t1", "o1", "b-three", "fp9", now, expire_at)).outcome == "conflict"
    assert await orders.committed_binding("t1", "o1") == "b-one"
    assert await orders.committed_binding("t1", "o2") is None


async def test_order_commit_script_only_for_the_claim_holder(redis: RedisClient, redis_sync: Any) -> None:
    """order_commit.lua: a create whose claim was taken over cannot commit."""
    orders = OrderClaims(redis)
    now = _now()
    await orders.claim("t1", "o1", "b-old", "fp", now - 1, now + DAY)
    await orders.claim("t1", "o1", "b-new", "fp", now + 60_000, now + DAY, cleaned="b-old")
    assert not await orders.commit("t1", "o1", "b-old", "fp", now - 1, now + 2 * DAY)
    assert await orders.committed_binding("t1", "o1") is None
    assert await orders.commit("t1", "o1", "b-new", "fp", now + 60_000, now + 2 * DAY)
    assert await orders.committed_binding("t1", "o1") == "b-new"
    assert abs(redis_sync.pexpiretime(order_key("t1", "o1")) - (now + 2 * DAY)) <= 1


async def test_compare_and_delete_script_releases_only_its_own_claim_and_lock(
    redis: RedisClient, redis_sync: Any
) -> None:
    """compare_and_delete.lua: an order claim or a mutation lock is released only by its holder."""
    orders = OrderClaims(redis)
    now = _now()
    await orders.claim("t1", "o1", "b1", "fp", now + 60_000, now + DAY)
    await orders.release("t1", "o1", "b-other", "fp", now + 60_000)
    assert redis_sync.exists(order_key("t1", "o1")) == 1
    await orders.release("t1", "o1", "b1", "fp", now + 60_000)
    assert redis_sync.exists(order_key("t1", "o1")) == 0

    locks = MutationLocks(redis, lease_ms=5000)
    async with locks.hold("b1"):
        assert redis_sync.exists(mutation_lock_key("b1")) == 1
        with pytest.raises(Aborted):
            async with locks.hold("b1"):
                pass
        assert redis_sync.exists(mutation_lock_key("b1")) == 1  # the loser did not release the holder's lock
    assert redis_sync.exists(mutation_lock_key("b1")) == 0
    await asyncio.sleep(0)


async def test_tenant_index_trims_ids_past_life_and_retention(redis: RedisClient, redis_sync: Any) -> None:
    index = TenantIndex(redis, retention_ms=DAY, max_life_ms=DAY)
    now = _now()
    old = new_binding_id(now - 3 * DAY)
    key = tenant_index_key("t1", tenant_shard(old))
    redis_sync.zadd(key, {old: 0})
    fresh = new_binding_id(now)
    while tenant_shard(fresh) != tenant_shard(old):  # the same shard, whose adds trim it
        fresh = new_binding_id(now)
    for _ in range(1000):  # trimming is probabilistic (1 in 64 adds of a shard)
        await index.add("t1", fresh, now)
        if redis_sync.zscore(key, old) is None:
            break
    assert redis_sync.zscore(key, old) is None, "the old id was never trimmed"
    page, more = await index.page("t1", "", 10)
    assert page == [fresh] and not more
