"""The shared binding-record and route scripts (libs/numprotect/core/lua) run twice with the same arguments, as a
cluster client does when it loses a reply and re-sends (docs/redis-schema.md, "Scripts run twice"): the second run
leaves the state the first left, and its answer is the one the table there promises."""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

from core.test_binding_records import B2, X, _commit, _now_ms, _record, redis
from core.test_routes import _route

from numprotect.core.binding_records import BindingEvent, BindingRecordStore, get_binding_history, number_history_key
from numprotect.core.redis_client import RedisClient
from numprotect.core.routes import MODE_AXE, NumberHistory, RouteTable
from support.event_outbox import expiries, expiry_hint, hinted, outbox
from support.redis_state import run_twice as twice

__all__ = ["redis"]  # the fixture of the record script tests, used here too

HOUR = 3_600_000
RECORD_KEYS = "np:b:{b1}"
NUMBER_KEYS = "np:*{" + X + "}*"  # the number's route keys, AXE marker and history
EVENT_KEYS = "np:ev:*"  # outboxes, expiries and their rings


async def test_record_create_repeated_is_written_again(redis: RedisClient, redis_sync: Any) -> None:
    """Without the check the repeat answered False ("the id exists"), the create's own record; a create of another
    record under the id (another create event) is still refused."""
    store = BindingRecordStore(redis, retention_ms=HOUR)
    record = _record(create_ms=_now_ms())
    create = functools.partial(store.create, record, reservation_id="r1", city_fallback=False)
    assert await twice(redis_sync, RECORD_KEYS, create) == (True, True)
    other = replace(record, create_ms=record.create_ms + 1, party_b=B2)
    assert not await store.create(other, reservation_id="r2", city_fallback=False)


async def test_record_update_repeated_appends_its_event_once(redis: RedisClient, redis_sync: Any) -> None:
    """Without the check the repeat appended the same event a second time to the binding's history."""
    store = BindingRecordStore(redis, retention_ms=HOUR)
    record = _record(create_ms=_now_ms())
    await _commit(store, record)
    later, new_expiry = record.create_ms + 1000, record.expire_ms + HOUR
    event = BindingEvent("update", later, {"b": B2, "exp": str(new_expiry)})
    fields = {"b": B2, "ems": str(new_expiry), "ums": str(later)}
    update = functools.partial(store.update, "b1", fields, event, end_ms=new_expiry)
    assert await twice(redis_sync, RECORD_KEYS, update) == (True, True)
    assert [e.kind for e in await get_binding_history(redis, "b1")] == ["create", "update"]
    # activate (fields only, no event) repeated: the same.
    assert await twice(redis_sync, RECORD_KEYS, functools.partial(store.activate, "b1")) == (True, True)
    # An update that also releases the writer's lock (a key of the record's slot holding the writer's token):
    # the repeat finds the lock gone and leaves it so, or a later writer's lock alone.
    redis_sync.set("np:b:{b1}:lk", "token-1")
    released = functools.partial(store.update, "b1", {"ums": str(later)}, None, release=("np:b:{b1}:lk", "token-1"))
    assert await twice(redis_sync, RECORD_KEYS + "*", released) == (True, True)
    assert redis_sync.exists("np:b:{b1}:lk") == 0
    redis_sync.set("np:b:{b1}:lk", "token-2")
    assert await released()
    assert redis_sync.get("np:b:{b1}:lk") == b"token-2"
    # The next update with an event of its own is appended.
    assert await store.update("b1", {"ums": str(later + 1)}, BindingEvent("update", later + 1, {"r": "1"}))
    assert [e.kind for e in await get_binding_history(redis, "b1")] == ["create", "update", "update"]


async def test_record_events_repeated_are_recorded_once(redis: RedisClient, redis_sync: Any) -> None:
    """The commit, an update event and a delete event, each run twice: one outbox entry each (binding.created,
    .updated, .deleted, in the record's slot), the slot's expiries and hints as after one run; a write of fields
    only records nothing."""
    store = BindingRecordStore(redis, retention_ms=HOUR)
    record = _record(create_ms=_now_ms())
    key = "np:b:{b1}"
    assert await store.create(record, reservation_id="r1", city_fallback=False)
    assert outbox(redis_sync, key) == [] and not hinted(redis_sync, key)  # pending: nobody is told yet
    activate = functools.partial(store.activate, "b1", record.end_ms(), expire_ms=record.expire_ms)
    assert await twice(redis_sync, (RECORD_KEYS, EVENT_KEYS), activate) == (True, True)
    created = {"ty": "binding.created", "tn": "t1", "at": str(record.create_ms), "src": "b1", "n": "1", "d": ""}
    assert outbox(redis_sync, key) == [created]
    assert hinted(redis_sync, key) and expiry_hint(redis_sync, key) == record.expire_ms
    assert expiries(redis_sync, key) == {"b1": record.expire_ms}

    later = record.create_ms + 1000
    event = BindingEvent("update", later, {"exp": str(record.expire_ms - 1)})
    update = functools.partial(store.update, "b1", {"ems": str(record.expire_ms - 1), "ums": str(later)}, event)
    assert await twice(redis_sync, (RECORD_KEYS, EVENT_KEYS), update) == (True, True)
    assert outbox(redis_sync, key)[1:] == [{**created, "ty": "binding.updated", "at": str(later), "n": "2"}]
    assert expiries(redis_sync, key) == {"b1": record.expire_ms - 1}
    assert expiry_hint(redis_sync, key) == record.expire_ms - 1  # lowered (ZADD LT)

    fields_only = functools.partial(store.update, "b1", {"pbh": B2}, None)
    assert await twice(redis_sync, (RECORD_KEYS, EVENT_KEYS), fields_only) == (True, True)
    assert len(outbox(redis_sync, key)) == 2

    redis_sync.set("np:b:{b1}:lk", "token-1")
    gone = later + 1
    delete = functools.partial(
        store.update,
        "b1",
        {"dms": str(gone), "ums": str(gone)},
        BindingEvent("delete", gone, {}),
        end_ms=gone,
        release=("np:b:{b1}:lk", "token-1"),
    )
    assert await twice(redis_sync, (RECORD_KEYS + "*", EVENT_KEYS), delete) == (True, True)
    assert outbox(redis_sync, key)[2:] == [{**created, "ty": "binding.deleted", "at": str(gone), "n": "3"}]
    assert expiries(redis_sync, key) == {} and redis_sync.exists("np:b:{b1}:lk") == 0


async def test_number_history_add_repeated(redis: RedisClient, redis_sync: Any) -> None:
    store = BindingRecordStore(redis, retention_ms=HOUR)
    add = functools.partial(store.add_to_history, X, "b1", _now_ms() + HOUR)
    assert await twice(redis_sync, NUMBER_KEYS, add) == (None, None)


async def test_routes_apply_repeated(redis: RedisClient, redis_sync: Any) -> None:
    """put, a put replacing party B's key, and remove: each repeat leaves the same keys and answers without error
    (the binding's own keys are no conflict)."""
    table = RouteTable(redis)
    route = _route()
    assert await twice(redis_sync, NUMBER_KEYS, functools.partial(table.put, X, route)) == (None, None)
    moved = replace(route, party_b=B2)
    replaced = functools.partial(table.put, X, moved, replaces=route.keys(X, ""))
    assert await twice(redis_sync, NUMBER_KEYS, replaced) == (None, None)
    assert await twice(redis_sync, NUMBER_KEYS, functools.partial(table.remove, X, moved)) == (None, None)
    # A create's put (until its deadline) with the binding's entry in the number's history, in the same script.
    history = NumberHistory(number_history_key(X), route.expire_ms, HOUR)
    with_history = functools.partial(table.put, X, _route("b3", party_b="13600000004"), history=history)
    assert await twice(redis_sync, NUMBER_KEYS, with_history) == (None, None)
    assert redis_sync.zscore(number_history_key(X), "b3") == route.expire_ms
    axe = _route("b2", MODE_AXE)
    assert await twice(redis_sync, NUMBER_KEYS, functools.partial(table.put, X, axe, "0001")) == (None, None)
