"""The router on a real Redis (standalone or cluster): outbox entries -> the tenant's log and the queues of the
endpoints that want them, with the body docs/events.md specifies; idempotent however often an entry is routed or by
how many routers; a lost hint recovered by the sweep; entries no event can be made of dropped, not blocking."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from dataclasses import replace
from typing import Any

from google.protobuf import json_format

from numprotect.cdr.v1 import cdr_pb2
from numprotect.core import event_keys
from numprotect.core.binding_records import BindingEvent, BindingRecord, BindingRecordStore, binding_key
from numprotect.core.clock import SystemClock
from numprotect.core.conversions import timestamp_from_ms
from numprotect.core.event_keys import TenantKeys
from numprotect.core.metrics import Metrics
from numprotect.services.events.log import EventLog
from numprotect.services.events.render import OutboxEntry, Renderer
from numprotect.services.events.router import ENTRIES_PER_TAKE, SLOTS_PER_BATCH, Router
from numprotect.services.events.slot_sweep import sweep_slots
from support.event_routing import (
    add_endpoint,
    add_entry,
    committed_binding,
    events_settings,
    log_entries,
    number_entry,
    outbox_length,
    queued,
    router_parts,
    sample,
)
from support.redis_state import plain

TENANT = "t1"
OTHER = "t2"
X = "70010000000"
CALLER = "13812345678"
A, B, B2 = "13800000001", "13900000002", "13900000003"


def binding_record(binding_id: str, now_ms: int, ttl_ms: int = 600_000, tenant_id: str = TENANT) -> BindingRecord:
    return BindingRecord(
        binding_id=binding_id,
        tenant_id=tenant_id,
        out_order_id="order-" + binding_id,
        mode=1,
        party_a=A,
        party_b=B,
        virtual_number=X,
        extension="",
        city_code="010",
        call_restriction=0,
        recording_enabled=False,
        allow_any_caller=False,
        user_consent=True,
        create_ms=now_ms,
        expire_ms=now_ms + ttl_ms,
        update_ms=now_ms,
        delete_ms=0,
    )


async def test_an_event_is_logged_once_and_queued_for_each_enabled_endpoint_that_wants_it(
    redis_env: dict[str, str], redis_sync: Any
) -> None:
    async with router_parts(redis_env) as (_, store, router, metrics):
        every = await add_endpoint(store, TENANT)
        numbers = await add_endpoint(store, TENANT, ["number.locked"])
        calls = await add_endpoint(store, TENANT, ["cdr.created"])
        elsewhere = await add_endpoint(store, OTHER)
        at = 1_790_000_000_123
        add_entry(redis_sync, 42, number_entry(TENANT, X, at))

        assert await router.poll() == 1

        [(log_id, fields)] = log_entries(redis_sync, TENANT)
        event_id = event_keys.event_id("number.locked", X, str(at))
        body = (
            f'{{"id":"{event_id}","type":"number.locked","timestamp":"2026-09-21T14:13:20.123Z",'
            f'"data":{{"virtualNumber":"{X}","tenantId":"{TENANT}","reason":"carrier fault"}}}}'
        )
        assert fields == {"id": event_id, "ty": "number.locked", "at": str(at), "p": body}
        assert queued(redis_sync, TENANT, every.endpoint_id) == [log_id]
        assert queued(redis_sync, TENANT, numbers.endpoint_id) == [log_id]
        assert queued(redis_sync, TENANT, calls.endpoint_id) == []
        assert queued(redis_sync, OTHER, elsewhere.endpoint_id) == []
        keys = TenantKeys(TENANT)
        assert {plain(k): plain(v) for k, v in redis_sync.hgetall(keys.attempts(every.endpoint_id)).items()} == {
            log_id: "0"
        }
        ready = {plain(m): s for m, s in redis_sync.zrange(keys.ready, 0, -1, withscores=True)}
        assert set(ready) == {every.endpoint_id, numbers.endpoint_id}
        assert plain(redis_sync.get(keys.seen(event_id))) == log_id
        assert 0 < redis_sync.pttl(keys.seen(event_id)) <= 2 * 3_600_000
        assert outbox_length(redis_sync, 42) == 0
        assert redis_sync.exists(event_keys.route_lease_key(42)) == 0
        assert sample(metrics, "numprotect_events_routed_total", {"type": "number.locked"}) == 1
        assert sample(metrics, "numprotect_events_route_lag_seconds_count") == 1


async def test_binding_events_carry_the_binding_as_each_event_left_it(
    redis_env: dict[str, str], redis_sync: Any
) -> None:
    async with router_parts(redis_env) as (redis, store, router, _):
        await add_endpoint(store, TENANT)
        now = SystemClock().now_ms()
        record = binding_record("b-render-1", now)
        # Created with recording on (the create's request says so), then B replaced and recording turned off.
        await committed_binding(redis, replace(record, recording_enabled=True), request="1|a|b|600000|010|0|0|1|0")
        records = BindingRecordStore(redis)
        changes = {"b": B2, "rec": "0"}
        await records.update(
            record.binding_id, {"b": B2, "rec": "0", "ums": str(now + 5)}, BindingEvent("update", now + 5, changes)
        )
        await records.update(
            record.binding_id, {"dms": str(now + 9), "ums": str(now + 9)}, BindingEvent("delete", now + 9, {})
        )
        assert await router.poll() == 3

        bodies = [json.loads(fields["p"]) for _, fields in log_entries(redis_sync, TENANT)]
        assert [b["type"] for b in bodies] == ["binding.created", "binding.updated", "binding.deleted"]
        assert [b["id"] for b in bodies] == [
            event_keys.event_id(t, record.binding_id, n)
            for t, n in (("binding.created", "1"), ("binding.updated", "2"), ("binding.deleted", "3"))
        ]
        created, updated, deleted = (b["data"] for b in bodies)
        assert (created["partyB"], created.get("recordingEnabled"), created["state"]) == (
            B,
            True,
            "BINDING_STATE_ACTIVE",
        )
        assert (updated["partyB"], updated.get("recordingEnabled"), updated["state"]) == (
            B2,
            None,  # false: left out of the JSON mapping
            "BINDING_STATE_ACTIVE",
        )
        assert deleted["state"] == "BINDING_STATE_DELETED"
        assert deleted["deleteTime"] == json_format.MessageToDict(timestamp_from_ms(now + 9))
        assert created["partyA"] == A and created["bindingId"] == record.binding_id  # the tenant's own parties
        stamp = dt.datetime.fromtimestamp((now + 5) / 1000, dt.UTC).isoformat(timespec="milliseconds")
        assert bodies[1]["timestamp"] == stamp.replace("+00:00", "Z")


async def test_cdr_and_abuse_events_mirror_their_messages_with_the_abuse_caller_masked(
    redis_env: dict[str, str], redis_sync: Any
) -> None:
    async with router_parts(redis_env) as (redis, _, router, _):
        cdr = cdr_pb2.CallDetailRecord(
            call_id="call-1",
            tenant_id=TENANT,
            calling_number=CALLER,
            called_number=X,
            carrier_id="c1",
            billable_seconds=62,
            call_time=timestamp_from_ms(1_790_000_000_000),
        )
        window = 1_789_999_200_000
        add_entry(
            redis_sync,
            7,
            {
                "ty": "cdr.created",
                "tn": TENANT,
                "at": "1790000000500",
                "src": "c1|call-1",
                "n": "",
                "d": cdr.SerializeToString(),
            },
        )
        add_entry(
            redis_sync,
            7,
            {
                "ty": "abuse.flagged",
                "tn": TENANT,
                "at": "1790000000600",
                "src": f"{X}|{CALLER}",
                "n": "",
                "d": f"{window}|8|3|12",  # window ms, short, unanswered, total
            },
        )
        assert await router.poll() == 2
        (_, cdr_fields), (_, abuse_fields) = log_entries(redis_sync, TENANT)
        cdr_body = json.loads(cdr_fields["p"])
        assert cdr_body["id"] == event_keys.event_id("cdr.created", "c1|call-1", "")
        with_ingest_time = cdr_pb2.CallDetailRecord()
        with_ingest_time.CopyFrom(cdr)
        with_ingest_time.ingest_time.CopyFrom(timestamp_from_ms(1_790_000_000_500))  # the entry's at
        assert cdr_body["data"] == json_format.MessageToDict(with_ingest_time)
        assert cdr_body["data"]["callingNumber"] == CALLER  # the tenant's own call, as its CDR shows it
        abuse = json.loads(abuse_fields["p"])
        assert abuse["id"] == event_keys.event_id("abuse.flagged", f"{X}|{CALLER}", str(window))
        assert abuse["data"] == {
            "virtualNumber": X,
            "callingNumber": "138****5678",
            "totalCalls": "12",
            "shortCalls": "8",
            "unansweredCalls": "3",
            "flagged": True,
            "windowStart": json_format.MessageToDict(timestamp_from_ms(window)),
        }
        assert await Renderer(redis).render([]) == []


async def test_an_event_recorded_twice_or_routed_again_is_logged_and_queued_once(
    redis_env: dict[str, str], redis_sync: Any
) -> None:
    async with router_parts(redis_env) as (redis, store, router, metrics):
        endpoint = await add_endpoint(store, TENANT)
        entry = number_entry(TENANT, X, 1_790_000_000_000)
        # A producer's script run twice: two entries, one event.
        add_entry(redis_sync, 3, entry)
        add_entry(redis_sync, 3, entry)
        assert await router.poll() == 1
        # A router that died after routing, before removing its entries: the same entry routed again.
        entry_id = add_entry(redis_sync, 3, entry)
        [rendered] = await router.renderer.render([OutboxEntry.decode(entry_id, entry)])
        assert not isinstance(rendered, Exception)
        command = router.route_command(TENANT, [rendered], await store.stored(TENANT))
        assert [int(r) for r in await redis.execute_command(*command.words)] == [0]
        assert await router.poll() == 0
        assert await router.sweep() == 0

        [(log_id, _)] = log_entries(redis_sync, TENANT)
        assert queued(redis_sync, TENANT, endpoint.endpoint_id) == [log_id]
        assert outbox_length(redis_sync, 3) == 0
        assert sample(metrics, "numprotect_events_routed_total", {"type": "number.locked"}) == 1


async def test_two_routers_at_once_log_and_queue_every_event_once(redis_env: dict[str, str], redis_sync: Any) -> None:
    async with router_parts(redis_env) as (redis, store, first, _):
        endpoint = await add_endpoint(store, TENANT)
        second = Router(redis, events_settings(), store, Metrics("events"), SystemClock())
        slots: tuple[int, ...] = (5, 1000, 16000)
        count = 0
        for slot in slots:  # more than one read per slot
            for i in range(ENTRIES_PER_TAKE + 50):
                add_entry(redis_sync, slot, number_entry(TENANT, f"7001{slot:04d}{i:03d}", 1_790_000_000_000 + i))
                count += 1
        many = range(2000, 2000 + 2 * SLOTS_PER_BATCH + 1)  # more slots than one batch reads
        for slot in many:
            add_entry(redis_sync, slot, number_entry(TENANT, f"7002{slot:07d}", 1_790_000_000_000))
            count += 1
        slots += tuple(many)
        routed = await asyncio.gather(first.poll(), second.poll(), first.sweep(), second.sweep())

        assert sum(routed) == count
        entries = log_entries(redis_sync, TENANT)
        assert len(entries) == count
        assert len({fields["id"] for _, fields in entries}) == count
        assert sorted(queued(redis_sync, TENANT, endpoint.endpoint_id)) == sorted(i for i, _ in entries)
        assert all(outbox_length(redis_sync, slot) == 0 for slot in slots)


async def test_a_lost_hint_delays_an_event_until_the_sweep(redis_env: dict[str, str], redis_sync: Any) -> None:
    async with router_parts(redis_env) as (_, _, router, _):
        add_entry(redis_sync, 9999, number_entry(TENANT, X, 1_790_000_000_000), hint=False)
        assert await router.poll() == 0
        assert log_entries(redis_sync, TENANT) == []
        assert await router.round() == 1  # the first round sweeps
        assert len(log_entries(redis_sync, TENANT)) == 1
        add_entry(redis_sync, 9999, number_entry(TENANT, X, 1_790_000_000_001), hint=False)
        assert await router.round() == 0  # the next sweep is a sweep interval away
        assert await router.sweep() == 1


async def test_entries_no_event_can_be_made_of_are_dropped_and_counted_without_blocking_the_outbox(
    redis_env: dict[str, str], redis_sync: Any
) -> None:
    async with router_parts(redis_env) as (_, _, router, metrics):
        slot = event_keys.key_slot(binding_key("b-gone"))
        bad: list[dict[str, str | bytes]] = [
            {"ty": "number.locked", "tn": "", "at": "1", "src": X, "n": "", "d": "r|a"},
            {"ty": "binding.renamed", "tn": TENANT, "at": "1", "src": "b-gone", "n": "1", "d": ""},
            {"ty": "binding.created", "tn": TENANT, "at": "1", "src": "b-gone", "n": "1", "d": ""},
            {"ty": "cdr.created", "tn": TENANT, "at": "1", "src": "c1|x", "n": "", "d": b"\xff\xff\xff"},
            {"ty": "abuse.flagged", "tn": TENANT, "at": "1", "src": f"{X}|{CALLER}", "n": "", "d": "soon"},
            {"ty": "number.locked", "tn": "t{1}", "at": "1", "src": X, "n": "", "d": "r|a"},
            {"ty": "number.locked", "tn": b"t\xff", "at": "1", "src": X, "n": "", "d": "r|a"},
            {"ty": "number.locked", "tn": TENANT, "at": "yesterday", "src": X, "n": "", "d": "r|a"},
            {"ty": "binding.updated", "tn": TENANT, "at": "1", "src": "b-torn", "n": "1", "d": ""},
        ]
        # A record in the same slot no binding service wrote so (its event unreadable).
        torn = binding_key(same_slot_binding_id(slot, "b-torn"))
        bad[-1]["src"] = torn[len("np:b:{") : -1]
        redis_sync.hset(torn, mapping={"t": TENANT, "cms": "1", "n": "1", "h1": "not an event"})
        for fields in bad:
            add_entry(redis_sync, slot, fields)
        add_entry(redis_sync, slot, number_entry(TENANT, X, 1_790_000_000_000))

        assert await router.poll() == 1
        assert [fields["ty"] for _, fields in log_entries(redis_sync, TENANT)] == ["number.locked"]
        assert outbox_length(redis_sync, slot) == 0
        dropped = {
            reason: sample(metrics, "numprotect_events_dropped_total", {"reason": reason})
            for reason in ("no_tenant", "unknown_type", "binding_gone", "malformed")
        }
        assert dropped == {"no_tenant": 1, "unknown_type": 1, "binding_gone": 1, "malformed": 6}


async def test_a_slot_another_router_holds_is_left_to_it_and_hinted_again(
    redis_env: dict[str, str], redis_sync: Any
) -> None:
    async with router_parts(redis_env) as (_, _, router, _):
        add_entry(redis_sync, 77, number_entry(TENANT, X, 1_790_000_000_000))
        redis_sync.set(event_keys.route_lease_key(77), "another-router", px=5000)
        assert await router.poll() == 0
        assert outbox_length(redis_sync, 77) == 1
        assert redis_sync.sismember(event_keys.ring_key(77), "77")  # looked at again next poll
        redis_sync.delete(event_keys.route_lease_key(77))  # that router finished (or its lease ran out)
        assert await router.poll() == 1
        assert outbox_length(redis_sync, 77) == 0


async def test_a_sweep_finds_every_slot_with_entries_also_beside_a_key_of_another_type(
    redis_env: dict[str, str], redis_sync: Any
) -> None:
    async with router_parts(redis_env) as (redis, _, router, _):
        slots = [0, 1, 5461, 5462, 10922, 10923, 16383]  # both ends of each master's range on the test cluster
        for slot in slots:
            add_entry(redis_sync, slot, number_entry(TENANT, X, 1_790_000_000_000 + slot), hint=False)
        assert await sweep_slots(redis, "length", event_keys.outbox_key) == dict.fromkeys(slots, 1)
        # A key of another type where an outbox would be: the call over its node fails, its slots are read one by one.
        redis_sync.set(event_keys.outbox_key(2), "not a stream")
        assert await sweep_slots(redis, "length", event_keys.outbox_key) == dict.fromkeys(slots, 1)
        assert await router.sweep() == len(slots)
        assert len(log_entries(redis_sync, TENANT)) == len(slots)


async def test_an_endpoint_deleted_after_the_router_read_it_gets_nothing(
    redis_env: dict[str, str], redis_sync: Any
) -> None:
    async with router_parts(redis_env) as (redis, store, router, _):
        kept = await add_endpoint(store, TENANT)
        gone = await add_endpoint(store, TENANT)
        assert len((await router.endpoints.of([TENANT]))[TENANT]) == 2  # cached for a second
        assert await store.delete(TENANT, gone.endpoint_id)
        add_entry(redis_sync, 8, number_entry(TENANT, X, 1_790_000_000_000))
        assert await router.poll() == 1
        [(log_id, _)] = log_entries(redis_sync, TENANT)
        assert queued(redis_sync, TENANT, kept.endpoint_id) == [log_id]
        keys = TenantKeys(TENANT)
        assert not any(redis_sync.exists(key) for key in keys.endpoint_keys(gone.endpoint_id))
        assert redis_sync.zscore(keys.ready, gone.endpoint_id) is None
        assert await EventLog(redis, events_settings(), SystemClock()).replay(gone, 0, 2**62) == 0


def same_slot_binding_id(slot: int, prefix: str) -> str:
    """A binding id whose record is in `slot`."""
    i = 0
    while event_keys.key_slot(binding_key(f"{prefix}-{i}")) != slot:
        i += 1
    return f"{prefix}-{i}"


async def test_entries_of_two_slots_with_the_same_id_are_each_removed_from_their_own_outbox(
    redis_env: dict[str, str], redis_sync: Any
) -> None:
    """Entry ids are unique within one stream only: two outboxes written in the same millisecond share ids."""
    async with router_parts(redis_env) as (_, _, router, _):
        broken = "t-broken"
        redis_sync.set(TenantKeys(broken).log, "not a stream")  # its route fails: its entry must stay
        redis_sync.xadd(event_keys.outbox_key(100), number_entry(TENANT, X, 1_790_000_000_000), id="5-1")
        redis_sync.xadd(event_keys.outbox_key(200), number_entry(broken, X, 1_790_000_000_000), id="5-1")
        redis_sync.sadd(event_keys.ring_key(100), 100)
        redis_sync.sadd(event_keys.ring_key(200), 200)
        assert await router.poll() == 1
        assert len(log_entries(redis_sync, TENANT)) == 1
        assert outbox_length(redis_sync, 100) == 0
        assert outbox_length(redis_sync, 200) == 1  # not routed: kept for the next round


async def test_a_tenant_whose_endpoints_cannot_be_read_waits_without_holding_up_the_others(
    redis_env: dict[str, str], redis_sync: Any
) -> None:
    async with router_parts(redis_env) as (_, store, router, _):
        await add_endpoint(store, TENANT)
        redis_sync.hset(TenantKeys(OTHER).endpoints, "ep_torn", b"\xff\xff\xff")  # no Endpoint message
        add_entry(redis_sync, 300, number_entry(OTHER, X, 1_790_000_000_000))
        add_entry(redis_sync, 300, number_entry(TENANT, X, 1_790_000_000_001))
        assert await router.poll() == 1
        assert len(log_entries(redis_sync, TENANT)) == 1
        assert log_entries(redis_sync, OTHER) == []
        assert outbox_length(redis_sync, 300) == 1  # the other tenant's entry, for a later round
        redis_sync.delete(TenantKeys(OTHER).endpoints)
        assert await router.sweep() == 1
        assert outbox_length(redis_sync, 300) == 0
