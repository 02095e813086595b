"""The binding service's own Redis keys: its Lua scripts (one test each) and the tenant index."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import ResponseError

from numprotect.core.binding_records import BindingRecordStore, binding_key, order_key
from numprotect.core.errors import Aborted
from numprotect.core.redis_client import RedisClient, create_redis, storage_unavailable
from numprotect.core.settings import Env, RedisSettings
from numprotect.services.binding.store import (
    MutationLocks,
    OrderClaims,
    PendingCreates,
    TenantIndex,
    mutation_lock_key,
    new_binding_id,
    tenant_index_key,
    tenant_shard,
)
from support.redis_server import fail_a_save, saving_redis, take_writes_again

DAY = 86_400_000


@pytest.fixture
async def redis(redis_env: dict[str, str]) -> AsyncIterator[RedisClient]:
    client = create_redis(RedisSettings.from_env(Env(redis_env)))
    yield client
    await client.aclose()


def _now() -> int:
    return time.time_ns() // 1_000_000


async def test_order_claim_script_outcomes(redis: RedisClient, redis_sync: Any) -> None:
    """order_claim.lua: claimed, busy (whatever the request, until the deadline), taken (deadline passed: the
    order is the new create's at once), done, conflict (done by another request), done for a legacy fingerprint."""
    orders = OrderClaims(redis)
    now = _now()
    expire_at = now + DAY
    first = await orders.claim("t1", "o1", "b-one", "fp1", now + 60_000, expire_at)
    assert (first.outcome, first.binding_id) == ("claimed", "b-one")
    assert abs(redis_sync.pexpiretime(order_key("t1", "o1")) - expire_at) <= 1
    busy = await orders.claim("t1", "o1", "b-two", "fp1", now + 60_000, expire_at)
    assert (busy.outcome, busy.binding_id) == ("busy", "b-one")
    other_request = await orders.claim("t1", "o1", "b-two", "fp2", now + 60_000, expire_at)
    assert (other_request.outcome, other_request.binding_id) == ("busy", "b-one")

    await orders.claim("t1", "o2", "b-old", "fp1", now - 1, expire_at)  # its deadline has passed
    taken = await orders.claim("t1", "o2", "b-new", "fp2", now + 60_000, expire_at)
    assert (taken.outcome, taken.binding_id) == ("taken", "b-old")
    assert redis_sync.get(order_key("t1", "o2")).decode().startswith("p|b-new|fp2|")

    assert await orders.commit("t1", "o1", "b-one", "fp1", now + 60_000, expire_at)
    done = await orders.claim("t1", "o1", "b-three", "fp1", now + 60_000, expire_at)
    assert (done.outcome, done.binding_id) == ("done", "b-one")
    assert (await orders.claim("t1", "o1", "b-three", "fp9", now, expire_at)).outcome == "conflict"
    legacy = await orders.claim("t1", "o1", "b-three", "fp9", now, expire_at, legacy_fp="fp1")
    assert (legacy.outcome, legacy.binding_id) == ("done", "b-one")
    assert await orders.committed_binding("t1", "o1") == "b-one"
    assert await orders.committed_binding("t1", "o2") is None


async def test_order_commit_script_only_for_the_claim_holder(redis: RedisClient, redis_sync: Any) -> None:
    """order_commit.lua: a create whose claim was taken over cannot commit."""
    orders = OrderClaims(redis)
    now = _now()
    await orders.claim("t1", "o1", "b-old", "fp", now - 1, now + DAY)
    await orders.claim("t1", "o1", "b-new", "fp", now + 60_000, now + DAY)
    assert not await orders.commit("t1", "o1", "b-old", "fp", now - 1, now + 2 * DAY)
    assert await orders.committed_binding("t1", "o1") is None
    assert await orders.commit("t1", "o1", "b-new", "fp", now + 60_000, now + 2 * DAY)
    assert await orders.committed_binding("t1", "o1") == "b-new"
    assert abs(redis_sync.pexpiretime(order_key("t1", "o1")) - (now + 2 * DAY)) <= 1


async def test_order_resolve_script_commits_or_aborts_never_both(redis: RedisClient, redis_sync: Any) -> None:
    """order_resolve.lua: the create itself aborts its claim at any time; recovery only past the deadline; a done
    order is "done" for its binding and "gone" for any other; an aborted create can no longer commit."""
    orders = OrderClaims(redis)
    now = _now()
    await orders.claim("t1", "o1", "b1", "fp", now + 60_000, now + DAY)
    assert await orders.resolve("t1", "o1", "b-other", own=True) == "gone"
    assert await orders.resolve("t1", "o1", "b1", own=False) == "busy"
    assert redis_sync.exists(order_key("t1", "o1")) == 1
    assert await orders.resolve("t1", "o1", "b1", own=True) == "aborted"
    assert redis_sync.exists(order_key("t1", "o1")) == 0
    assert not await orders.commit("t1", "o1", "b1", "fp", now + 60_000, now + DAY)
    assert await orders.resolve("t1", "o1", "b1", own=True) == "gone"

    await orders.claim("t1", "o2", "b2", "fp", now - 1, now + DAY)  # past its deadline
    assert await orders.resolve("t1", "o2", "b2", own=False) == "aborted"
    await orders.claim("t1", "o3", "b3", "fp", now + 60_000, now + DAY)
    assert await orders.commit("t1", "o3", "b3", "fp", now + 60_000, now + DAY)
    assert await orders.resolve("t1", "o3", "b3", own=True) == "done"
    assert await orders.resolve("t1", "o3", "b3", own=False) == "done"
    assert await orders.committed_binding("t1", "o3") == "b3"


async def test_compare_and_delete_script_releases_only_its_own_order_and_lock(
    redis: RedisClient, redis_sync: Any
) -> None:
    """compare_and_delete.lua: a done order is forgotten only for its binding and fingerprint; a mutation lock is
    released only by its holder."""
    orders = OrderClaims(redis)
    now = _now()
    await orders.claim("t1", "o1", "b1", "fp", now + 60_000, now + DAY)
    await orders.commit("t1", "o1", "b1", "fp", now + 60_000, now + DAY)
    await orders.forget("t1", "o1", "b-other", ("fp",))
    await orders.forget("t1", "o1", "b1", ("fp-other",))
    assert redis_sync.exists(order_key("t1", "o1")) == 1
    await orders.forget("t1", "o1", "b1", ("fp-other", "fp"))
    assert redis_sync.exists(order_key("t1", "o1")) == 0

    locks = MutationLocks(redis, lease_ms=5000)
    async with locks.hold("b1"):
        assert redis_sync.exists(mutation_lock_key("b1")) == 1
        with pytest.raises(Aborted):
            async with locks.hold("b1", wait_seconds=0.05):
                pass
        assert redis_sync.exists(mutation_lock_key("b1")) == 1  # the loser did not release the holder's lock
    assert redis_sync.exists(mutation_lock_key("b1")) == 0
    await asyncio.sleep(0)


async def test_lock_and_read_locks_only_the_tenant_s_committed_record(redis: RedisClient, redis_sync: Any) -> None:
    """lock_and_read.lua: another tenant's record and a missing one are "missing", a create's pending record is
    "pending", none of them locked; a committed one is read and locked ("locked"), then "busy" for another call
    until the holder releases it (or a write of the holder does: binding_record_update.lua's release)."""
    locks = MutationLocks(redis, lease_ms=5000)
    redis_sync.hset(binding_key("b1"), mapping={"t": "t1", "cms": "1", "st": "p", "b": "13900000002"})
    for tenant, binding_id, outcome in (("t2", "b1", "missing"), ("t1", "b9", "missing"), ("t1", "b1", "pending")):
        async with locks.hold_record(binding_id, tenant) as read:
            assert (read.outcome, read.lease) == (outcome, None)
            assert read.fields.get("b") == ("13900000002" if outcome == "pending" else None)
        assert redis_sync.exists(mutation_lock_key(binding_id)) == 0
    redis_sync.hset(binding_key("b1"), "st", "a")
    async with locks.hold_record("b1", "t1") as read:
        assert read.outcome == "locked" and read.lease is not None and read.fields["b"] == "13900000002"
        assert redis_sync.get(mutation_lock_key("b1")) == read.lease.token.encode()
        with pytest.raises(Aborted):
            async with locks.hold_record("b1", "t1", wait_seconds=0.05):
                pass
        assert redis_sync.get(mutation_lock_key("b1")) == read.lease.token.encode()
    assert redis_sync.exists(mutation_lock_key("b1")) == 0
    # A write that releases the lock (a delete's record write) leaves the holder nothing to release.
    async with locks.hold_record("b1", "t1") as read:
        assert read.lease is not None
        records = BindingRecordStore(redis)
        assert await records.update("b1", {"ums": "2"}, None, release=read.lease.holder)
        assert redis_sync.exists(mutation_lock_key("b1")) == 0
        read.lease.released = True
        redis_sync.set(mutation_lock_key("b1"), "the-next-call")
    assert redis_sync.get(mutation_lock_key("b1")) == b"the-next-call"


async def test_lock_and_read_while_writes_are_refused_fails_like_a_write_not_busy(tmp_path: Path) -> None:
    """While Redis refuses writes (MISCONF after a failed save), taking a lock a failed attempt left (its release is
    refused too) fails as the call's writes would, UNAVAILABLE, not "busy" (ABORTED "being changed by another call":
    the chaos suite's disk-full fault, a delete's retry); reading a missing record still answers."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    server = saving_redis(data_dir)
    admin = server.client()
    client = create_redis(RedisSettings.from_env(Env({"NUMPROTECT_REDIS_URL": server.url})))
    try:
        admin.hset(binding_key("b1"), mapping={"t": "t1", "cms": "1", "st": "a"})
        admin.set(mutation_lock_key("b1"), "the-failed-attempt")
        locks = MutationLocks(client, lease_ms=5000)
        async with locks.hold_record("b9", "t1") as read:  # the script is loaded while writes are taken
            assert read.outcome == "missing"
        fail_a_save(admin, data_dir)
        with pytest.raises(ResponseError) as refused:
            async with locks.hold_record("b1", "t1", wait_seconds=0.05):
                pass
        assert storage_unavailable(refused.value) is not None, refused.value
        async with locks.hold_record("b9", "t1") as read:
            assert read.outcome == "missing"
        take_writes_again(admin)
    finally:
        await client.aclose()
        admin.close()
        server.stop()


async def test_pending_creates_list_orders_by_deadline_across_shards(redis: RedisClient) -> None:
    pending = PendingCreates(redis)
    now = _now()
    ids = [new_binding_id(now) for _ in range(40)]
    for i, binding_id in enumerate(ids):
        await pending.add(binding_id, now - 1000 if i % 2 else now + 60_000)
    overdue = await pending.overdue(now, per_shard=100)
    assert sorted(overdue) == sorted(ids[1::2])
    for binding_id in ids:
        await pending.remove(binding_id)
    assert await pending.overdue(now + 120_000, per_shard=100) == []


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
