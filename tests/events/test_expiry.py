"""binding.expired for bindings nobody touches (the expirer, then the router), on a real Redis (standalone or
cluster): within 5 s of the expiry instant; once; never for a binding extended, deleted or not committed; a hint
lost with a crashed producer recovered by the sweep; a producer's expiry added while the ring is re-armed kept."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from events.test_router import TENANT, binding_record, same_slot_binding_id

from numprotect.core import event_keys
from numprotect.core.binding_records import BindingEvent, BindingRecordStore, binding_key
from numprotect.core.clock import SystemClock
from numprotect.core.metrics import Metrics
from numprotect.core.redis_batch import raise_first, send_together
from numprotect.core.redis_client import RedisClient
from numprotect.services.events.expirer import Expirer
from numprotect.services.events.router import Router
from support.event_outbox import expiries, outbox
from support.event_routing import add_endpoint, committed_binding, events_settings, log_entries, queued, router_parts

# What the issue promises: binding.expired within 5 s of the expiry instant.
EXPIRY_PROMISE_MS = 5000


def now_ms() -> int:
    return SystemClock().now_ms()


# Sweeps (16,384 reads each, of the expiries and of the outboxes) at start only: the promise is the running service's.
RARE_SWEEPS = {"NUMPROTECT_EVENTS_SWEEP_INTERVAL": "10m"}


@asynccontextmanager
async def running(redis: RedisClient, router: Router) -> AsyncIterator[Expirer]:
    """The expirer and the router running in the background, as the events service runs them, their start-up rounds
    (and sweeps) done."""
    expirer = Expirer(redis, events_settings(**RARE_SWEEPS), Metrics("events"), SystemClock())
    await expirer.round()
    await router.round()
    expirer.start()
    router.start()
    try:
        yield expirer
    finally:
        await router.close()
        await expirer.close()


async def wait_for_type(redis_sync: Any, event_type: str, timeout_s: float) -> tuple[int, dict[str, str]]:
    """(wall ms when it was first seen, its log fields) of the tenant's first event of `event_type`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for _, fields in log_entries(redis_sync, TENANT):
            if fields["ty"] == event_type:
                return now_ms(), fields
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {event_type} within {timeout_s} s")


def expired_entries(redis_sync: Any, binding_id: str) -> list[dict[str, str]]:
    return [e for e in outbox(redis_sync, binding_key(binding_id)) if e["ty"] == "binding.expired"]


async def test_a_binding_nobody_touches_is_told_expired_within_5_s_of_its_expiry(
    redis_env: dict[str, str], redis_sync: Any
) -> None:
    # The service runs before the binding is made: on a loaded host the start-up sweeps took seconds, and with a
    # sweep every second (FAST_EVENTS) they came between every expiry poll (binding.expired 6.5 s late).
    async with router_parts(redis_env, **RARE_SWEEPS) as (redis, store, router, _):
        endpoint = await add_endpoint(store, TENANT, ["binding.expired"])
        async with running(redis, router):
            record = binding_record("b-exp-1", now_ms(), ttl_ms=800)
            await committed_binding(redis, record)
            seen_ms, fields = await wait_for_type(redis_sync, "binding.expired", timeout_s=10)
        lag_ms = seen_ms - record.expire_ms
        print(f"binding.expired routed {lag_ms} ms after the expiry instant")
        assert 0 <= lag_ms < EXPIRY_PROMISE_MS
        body = json.loads(fields["p"])
        assert body["id"] == event_keys.event_id("binding.expired", record.binding_id, str(record.expire_ms))
        assert fields["at"] == str(record.expire_ms)
        assert body["data"]["state"] == "BINDING_STATE_EXPIRED"
        assert body["data"]["bindingId"] == record.binding_id
        [(log_id, _)] = [(i, f) for i, f in log_entries(redis_sync, TENANT) if f["ty"] == "binding.expired"]
        assert queued(redis_sync, TENANT, endpoint.endpoint_id) == [log_id]  # it wants binding.expired only
        assert expiries(redis_sync, binding_key(record.binding_id)) == {}


async def test_an_extended_binding_is_not_expired_at_its_old_expiry(redis_env: dict[str, str], redis_sync: Any) -> None:
    async with router_parts(redis_env) as (redis, _, _, _):
        record = binding_record("b-exp-2", now_ms(), ttl_ms=300)
        await committed_binding(redis, record)
        later = record.expire_ms + 60_000
        await BindingRecordStore(redis).update(
            record.binding_id, {"ems": str(later)}, BindingEvent("update", now_ms(), {"exp": str(later)})
        )
        key = binding_key(record.binding_id)
        # Also when the expiries still name the old time (a write the zset missed): the record decides.
        redis_sync.zadd(event_keys.expiry_key_beside(key), {record.binding_id: record.expire_ms})
        expirer = Expirer(redis, events_settings(), Metrics("events"), SystemClock())
        await asyncio.sleep(0.4)
        await expirer.round()
        assert expired_entries(redis_sync, record.binding_id) == []
        assert expiries(redis_sync, key) == {record.binding_id: later}


async def test_a_deleted_or_uncommitted_binding_is_not_expired(redis_env: dict[str, str], redis_sync: Any) -> None:
    async with router_parts(redis_env) as (redis, _, _, _):
        records = BindingRecordStore(redis)
        deleted = binding_record("b-exp-3", now_ms(), ttl_ms=300)
        await committed_binding(redis, deleted)
        at = now_ms()
        await records.update(
            deleted.binding_id, {"dms": str(at), "ums": str(at)}, BindingEvent("delete", at, {}), end_ms=at
        )
        pending = binding_record("b-exp-4", now_ms(), ttl_ms=300)
        await records.create(pending, reservation_id="r-2", city_fallback=False)
        for record in (deleted, pending):  # named in the expiries all the same
            redis_sync.zadd(event_keys.expiry_key_beside(binding_key(record.binding_id)), {record.binding_id: 1})
        expirer = Expirer(redis, events_settings(), Metrics("events"), SystemClock())
        await asyncio.sleep(0.4)
        await expirer.round()
        for record in (deleted, pending):
            assert expired_entries(redis_sync, record.binding_id) == []
            assert expiries(redis_sync, binding_key(record.binding_id)) == {}


async def test_an_expiry_is_recorded_once_by_two_expirers_at_once(redis_env: dict[str, str], redis_sync: Any) -> None:
    async with router_parts(redis_env) as (redis, _, _, _):
        bindings = [binding_record(f"b-exp-many-{i}", now_ms(), ttl_ms=200) for i in range(30)]
        for record in bindings:
            await committed_binding(redis, record)
        first, second = (Expirer(redis, events_settings(), Metrics("events"), SystemClock()) for _ in range(2))
        await asyncio.sleep(0.3)
        counts = await asyncio.gather(first.round(), second.round(), first.expire_due())
        assert sum(counts) == len(bindings)
        for record in bindings:
            assert len(expired_entries(redis_sync, record.binding_id)) == 1


async def test_a_lost_expiry_hint_is_recovered_by_the_sweep(redis_env: dict[str, str], redis_sync: Any) -> None:
    async with router_parts(redis_env) as (redis, _, _, _):
        record = binding_record("b-exp-5", now_ms(), ttl_ms=200)
        await committed_binding(redis, record)
        slot = event_keys.key_slot(binding_key(record.binding_id))
        redis_sync.zrem(event_keys.expiry_ring_key(slot), str(slot))  # the producer died before its hint
        expirer = Expirer(redis, events_settings(), Metrics("events"), SystemClock())
        await asyncio.sleep(0.3)
        assert await expirer.expire_due() == 0  # nothing hinted
        assert await expirer.round() == 1  # the first round sweeps
        assert len(expired_entries(redis_sync, record.binding_id)) == 1
        # The router is hinted: the slot is in its ring.
        assert redis_sync.sismember(event_keys.ring_key(slot), str(slot))


async def test_the_ring_keeps_an_expiry_a_producer_adds_while_it_is_re_armed(
    redis_env: dict[str, str], redis_sync: Any
) -> None:
    async with router_parts(redis_env) as (redis, _, _, _):
        due = binding_record("b-exp-6", now_ms(), ttl_ms=100)
        await committed_binding(redis, due)
        key = binding_key(due.binding_id)
        slot = event_keys.key_slot(key)
        ring = event_keys.expiry_ring_key(slot)
        expirer = Expirer(redis, events_settings(), Metrics("events"), SystemClock())
        await asyncio.sleep(0.2)
        # expire_due.lua ran and found nothing left in the slot ...
        [reply] = raise_first(await send_together(redis, [expirer.expire_command(slot)]))
        assert [int(r) for r in reply] == [1, -1]
        # ... then a producer commits a binding of the same slot expiring later: its ZADD LT leaves the ring as it
        # was (the due score is earlier), and only then is the ring re-armed.
        later = binding_record(same_slot_binding_id(slot, "b-exp-7"), now_ms(), ttl_ms=60_000)
        await committed_binding(redis, later)
        found = int(redis_sync.zscore(ring, str(slot)))
        assert found == due.expire_ms
        await expirer._rearm_slots({slot: (found, -1)})
        assert int(redis_sync.zscore(ring, str(slot))) == later.expire_ms
