"""The shared binding-record schema: records, their events, and tracing a number at a moment."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from numprotect.core.binding_records import (
    BindingEvent,
    BindingRecord,
    BindingRecordStore,
    binding_key,
    get_binding_history,
    get_binding_records,
    get_binding_records_at,
    get_stored_bindings,
    number_history_key,
    trace_number,
)
from numprotect.core.clock import SystemClock
from numprotect.core.redis_client import RedisClient, create_redis
from numprotect.core.routes import MODE_AXB, MODE_AXE, RESTRICTION_NONE
from numprotect.core.settings import Env, RedisSettings

X = "700100000000001"
A = "13800000001"
B = "13900000002"
B2 = "13700000003"
HOUR = 3_600_000


def _now_ms() -> int:
    return SystemClock().now_ms()


def _record(binding_id: str = "b1", *, create_ms: int, ttl_ms: int = HOUR, **overrides: Any) -> BindingRecord:
    record = BindingRecord(
        binding_id=binding_id,
        tenant_id="t1",
        out_order_id=f"o-{binding_id}",
        mode=MODE_AXB,
        party_a=A,
        party_b=B,
        virtual_number=X,
        extension="",
        city_code="010",
        call_restriction=RESTRICTION_NONE,
        recording_enabled=True,
        allow_any_caller=False,
        user_consent=True,
        create_ms=create_ms,
        expire_ms=create_ms + ttl_ms,
        update_ms=create_ms,
        delete_ms=0,
    )
    return replace(record, **overrides)


@pytest.fixture
async def redis(redis_env: dict[str, str]) -> AsyncIterator[RedisClient]:
    client = create_redis(RedisSettings.from_env(Env(redis_env)))
    yield client
    await client.aclose()


async def _commit(store: BindingRecordStore, record: BindingRecord) -> None:
    assert await store.create(record, reservation_id="r-" + record.binding_id, city_fallback=False)
    await store.add_to_history(record.virtual_number, record.binding_id, record.expire_ms)
    assert await store.activate(record.binding_id)


def test_end_ms_is_the_earlier_of_expiry_and_deletion() -> None:
    record = _record(create_ms=1000, ttl_ms=5000)
    assert record.end_ms() == 6000
    assert replace(record, delete_ms=3000).end_ms() == 3000
    assert replace(record, delete_ms=9000).end_ms() == 6000


def test_events_round_trip() -> None:
    event = BindingEvent("update", 123, {"b": B2, "exp": "999"})
    assert BindingEvent.decode(event.encode()) == event
    assert BindingEvent.decode("delete|5|") == BindingEvent("delete", 5, {})


async def test_create_script_writes_once_with_retention_and_pending_is_hidden(
    redis: RedisClient, redis_sync: Any
) -> None:
    """binding_record_create.lua: writes the hash and its first event once; a second create writes nothing."""
    store = BindingRecordStore(redis, retention_ms=10 * HOUR)
    record = _record(create_ms=_now_ms())
    assert await store.create(record, reservation_id="r1", city_fallback=True)
    assert not await store.create(replace(record, party_b=B2), reservation_id="r2", city_fallback=False)
    assert abs(redis_sync.pexpiretime(binding_key("b1")) - (record.expire_ms + 10 * HOUR)) <= 1
    stored = (await get_stored_bindings(redis, ["b1"]))["b1"]
    assert stored.pending and stored.reservation_id == "r1" and stored.city_fallback
    assert stored.record == record
    assert [e.kind for e in stored.events] == ["create"]
    # Pending (uncommitted) records are not bindings for readers.
    assert await get_binding_records(redis, ["b1"]) == {}
    assert await store.activate("b1")
    # A pending record may be given a short life; activation then keeps it for end + retention.
    short = _record("b2", create_ms=_now_ms())
    assert await store.create(short, reservation_id="r", city_fallback=False, keep_until_ms=short.create_ms + 5000)
    assert abs(redis_sync.pexpiretime(binding_key("b2")) - (short.create_ms + 5000)) <= 1
    assert await store.activate("b2", short.end_ms())
    assert abs(redis_sync.pexpiretime(binding_key("b2")) - (short.expire_ms + 10 * HOUR)) <= 1
    assert await get_binding_records(redis, ["b1", "missing"]) == {"b1": record}


async def test_update_script_appends_events_and_moves_retention(redis: RedisClient, redis_sync: Any) -> None:
    """binding_record_update.lua: sets fields, appends an event, re-sets retention; unknown id writes nothing."""
    store = BindingRecordStore(redis, retention_ms=HOUR)
    record = _record(create_ms=_now_ms())
    await _commit(store, record)
    later = record.create_ms + 1000
    new_expiry = record.expire_ms + HOUR
    event = BindingEvent("update", later, {"b": B2, "exp": str(new_expiry)})
    assert await store.update("b1", {"b": B2, "ems": str(new_expiry), "ums": str(later)}, event, end_ms=new_expiry)
    assert abs(redis_sync.pexpiretime(binding_key("b1")) - (new_expiry + HOUR)) <= 1
    history = await get_binding_history(redis, "b1")
    assert [e.kind for e in history] == ["create", "update"]
    assert history[1].changes == {"b": B2, "exp": str(new_expiry)}
    assert not await store.update("nope", {"b": B2}, event)
    assert redis_sync.exists(binding_key("nope")) == 0


async def test_history_script_raises_scores_trims_and_expires(redis: RedisClient, redis_sync: Any) -> None:
    """The history part of routes_apply.lua: score only raised, entries past retention trimmed, key expiry pushed
    later."""
    store = BindingRecordStore(redis, retention_ms=HOUR)
    now = _now_ms()
    key = number_history_key(X)
    await store.add_to_history(X, "b1", now + 5000)
    await store.add_to_history(X, "b1", now + 1000)  # a shortening never lowers the score
    assert redis_sync.zscore(key, "b1") == now + 5000
    await store.add_to_history(X, "b1", now + 9000)
    assert redis_sync.zscore(key, "b1") == now + 9000
    assert abs(redis_sync.pexpiretime(key) - (now + 9000 + HOUR)) <= 1
    redis_sync.zadd(key, {"old": now - 2 * HOUR})  # ended two hours ago: beyond the 1 h retention
    await store.add_to_history(X, "b2", now + 1000)
    assert redis_sync.zscore(key, "old") is None
    assert redis_sync.zscore(key, "b2") == now + 1000
    assert abs(redis_sync.pexpiretime(key) - (now + 9000 + HOUR)) <= 1  # never pulled earlier


async def test_trace_before_during_after_and_across_a_party_change(redis: RedisClient) -> None:
    store = BindingRecordStore(redis)
    t0 = _now_ms() - 10 * HOUR
    first = _record("b1", create_ms=t0, ttl_ms=2 * HOUR)
    await _commit(store, first)
    # B replaced by B2 one hour in.
    changed = t0 + HOUR
    await store.update("b1", {"b": B2, "ums": str(changed)}, BindingEvent("update", changed, {"b": B2}))
    second = _record("b2", create_ms=t0 + 3 * HOUR, ttl_ms=HOUR, party_a="13600000004", party_b="13500000005")
    await _commit(store, second)

    assert await trace_number(redis, X, t0 - 1) == []
    during = await trace_number(redis, X, t0 + 10)
    assert [(r.binding_id, r.party_b) for r in during] == [("b1", B)]
    assert [r.party_b for r in await trace_number(redis, X, changed)] == [B2]
    at_call = await get_binding_records_at(redis, ["b1", "missing"], t0 + 10)
    assert list(at_call) == ["b1"] and at_call["b1"].party_b == B
    assert (await get_binding_records_at(redis, ["b1"], changed))["b1"].party_b == B2
    assert (await get_binding_records(redis, ["b1"]))["b1"].party_b == B2  # current values
    assert await trace_number(redis, X, t0 + 10, party=B) != []
    assert await trace_number(redis, X, t0 + HOUR + 10, party=B) == []  # the old B no longer a party
    assert await trace_number(redis, X, t0 + HOUR + 10, party=A) != []
    assert await trace_number(redis, X, t0 + 2 * HOUR) == []  # b1 expired exactly then
    assert [r.binding_id for r in await trace_number(redis, X, t0 + 3 * HOUR + 5)] == ["b2"]
    assert await trace_number(redis, X, _now_ms()) == []
    assert await trace_number(redis, "700100000000009", t0 + 10) == []


async def test_trace_honours_deletion_extension_and_pending(redis: RedisClient) -> None:
    store = BindingRecordStore(redis)
    t0 = _now_ms() - HOUR
    e1 = _record("e1", create_ms=t0, mode=MODE_AXE, extension="0001")
    e2 = _record("e2", create_ms=t0, mode=MODE_AXE, extension="0002", party_a="13600000004")
    await _commit(store, e1)
    await _commit(store, e2)
    pending = _record("p1", create_ms=t0, mode=MODE_AXE, extension="0003")
    assert await store.create(pending, reservation_id="r", city_fallback=False)
    await store.add_to_history(X, "p1", pending.expire_ms)
    assert [r.binding_id for r in await trace_number(redis, X, t0 + 5)] == ["e1", "e2"]
    assert [r.binding_id for r in await trace_number(redis, X, t0 + 5, extension="0002")] == ["e2"]
    deleted_at = t0 + 100
    await store.update("e1", {"dms": str(deleted_at)}, BindingEvent("delete", deleted_at, {}), end_ms=deleted_at)
    assert [r.binding_id for r in await trace_number(redis, X, t0 + 50)] == ["e1", "e2"]
    assert [r.binding_id for r in await trace_number(redis, X, deleted_at)] == ["e2"]
    history = await get_binding_history(redis, "e1")
    assert [e.kind for e in history] == ["create", "delete"]  # deleted before expiry: no expire event


async def test_expiry_is_derived_in_the_history(redis: RedisClient) -> None:
    store = BindingRecordStore(redis)
    record = _record(create_ms=_now_ms() - 2 * HOUR)
    await _commit(store, record)
    history = await get_binding_history(redis, "b1")
    assert [(e.kind, e.at_ms) for e in history] == [("create", record.create_ms), ("expire", record.expire_ms)]
