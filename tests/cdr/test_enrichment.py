"""Enrichment: live bindings by binding_id and call_ref, expired bindings through the history, unknown ones
kept and flagged in the operator's unmatched bucket."""

from __future__ import annotations

from typing import Any

from cdr.conftest import bucket_of

from numprotect.cdr.v1 import cdr_pb2
from numprotect.core.call_ref import CallRef

X = "700100000000001"
X2 = "700100000000002"
DAY = 86_400_000


def _now_ms() -> int:
    import time

    return time.time_ns() // 1_000_000


async def _all(stub: Any, tenant_id: str = "", *, unmatched: bool = False) -> dict[str, cdr_pb2.CallDetailRecord]:
    reply = await stub.ListCdrs(cdr_pb2.ListCdrsRequest(tenant_id=tenant_id, unmatched=unmatched, page_size=1000))
    return {r.call_id: r for r in reply.records}


async def test_live_binding_by_binding_id_and_by_call_ref(
    cdr_service: Any, make_record: Any, make_binding: Any
) -> None:
    live = await make_binding("b-live", tenant_id="t-shop", out_order_id="order-77")
    ref = CallRef("b-live", X, _now_ms() - 130_000, trace_id=0xABC, span_id=0xDEF).encode()
    records = [
        make_record("by-id", binding_id="b-live"),
        make_record("by-ref", call_ref=ref),
        # A carrier-sent tenant is not trusted: the binding's tenant wins.
        make_record("by-id-wrong-tenant", binding_id="b-live", tenant_id="t-other"),
    ]
    async with cdr_service() as cdr:
        reply = await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=records))
        assert reply.accepted == 3
        got = await _all(cdr.tenant("t-shop"), "t-shop")
    assert set(got) == {"by-id", "by-ref", "by-id-wrong-tenant"}
    assert got["by-id"].binding_match == cdr_pb2.BINDING_MATCH_BINDING_ID
    assert got["by-ref"].binding_match == cdr_pb2.BINDING_MATCH_CALL_REF
    for record in got.values():
        assert (record.binding_id, record.tenant_id, record.out_order_id) == ("b-live", "t-shop", live.out_order_id)
        assert record.HasField("ingest_time")
        assert record.billable_seconds == 30


async def test_expired_binding_is_found_through_the_number_history(
    cdr_service: Any, make_record: Any, make_binding: Any
) -> None:
    long_ago = _now_ms() - 40 * DAY
    # The number served two pairs at that time, and later someone else: (X, caller, time) picks the right one.
    await make_binding("b-old", tenant_id="t-old", create_ms=long_ago, ttl_ms=2 * 3_600_000)
    await make_binding(
        "b-old-other-pair", tenant_id="t-other", party_a="13700000003", party_b="13600000004", create_ms=long_ago
    )
    await make_binding("b-new", tenant_id="t-new", create_ms=_now_ms() - 60_000)
    records = [
        make_record("late", call_ms=long_ago + 3_600_000),
        # A dials X to reach B: the lookup also works from the target's side.
        make_record(
            "late-a",
            call_ms=long_ago + 3_600_000,
            calling_number="13900000002",
            target_number="13800000001",
            call_type=cdr_pb2.CALL_TYPE_A_TO_PEER,
        ),
        make_record("after-expiry", call_ms=long_ago + 3 * 3_600_000),
    ]
    async with cdr_service() as cdr:
        reply = await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=records))
        assert reply.accepted == 3
        old = await _all(cdr.tenant("t-old"), "t-old")
        unmatched = await _all(cdr.operator, unmatched=True)
    assert set(old) == {"late", "late-a"}
    for record in old.values():
        assert record.binding_match == cdr_pb2.BINDING_MATCH_HISTORY
        assert record.binding_id == "b-old"
    # Between the old binding's expiry and the new one's creation, X served nobody.
    assert set(unmatched) == {"after-expiry"}
    assert unmatched["after-expiry"].binding_match == cdr_pb2.BINDING_MATCH_NONE


async def test_unknown_bindings_are_kept_flagged_and_listed_for_the_operator(
    cdr_service: Any, make_record: Any, make_binding: Any, redis_sync: Any
) -> None:
    await make_binding("b-x2", virtual_number=X2, tenant_id="t-x2")
    foreign_ref = CallRef("b-x2", X2, _now_ms()).encode()
    records = [
        make_record("no-binding"),
        make_record("unknown-id", binding_id="b-does-not-exist", tenant_id="t-claimed"),
        # binding_id and call_ref of another number are not trusted.
        make_record("wrong-number-id", binding_id="b-x2"),
        make_record("wrong-number-ref", call_ref=foreign_ref),
        make_record("garbage-ref", call_ref="not-a-call-ref"),
    ]
    async with cdr_service() as cdr:
        reply = await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=records))
        assert (reply.accepted, len(reply.rejected)) == (5, 0)
        unmatched = await _all(cdr.operator, unmatched=True)
        assert await _all(cdr.tenant("t-x2"), "t-x2") == {}
        assert await _all(cdr.tenant("t-claimed"), "t-claimed") == {}
    assert set(unmatched) == {r.call_id for r in records}
    assert all(r.binding_match == cdr_pb2.BINDING_MATCH_NONE for r in unmatched.values())
    # What the carrier said is kept for the operator to investigate.
    assert unmatched["unknown-id"].binding_id == "b-does-not-exist"
    assert redis_sync.xlen(bucket_of(redis_sync, "").stream) == 5
    # Resending is still exactly once for unmatched records.
    async with cdr_service() as cdr:
        again = await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=records))
    assert (again.accepted, again.duplicates) == (0, 5)


async def test_the_binding_cache_keeps_found_bindings_only_and_stays_bounded(
    redis: Any, redis_sync: Any, make_binding: Any
) -> None:
    from numprotect.core.binding_records import binding_key
    from numprotect.core.limits import ConcurrencyLimit
    from numprotect.services.cdr.bindings import RedisBindingLookup

    lookup = RedisBindingLookup(redis, ConcurrencyLimit(4, wait_seconds=2, name="redis operations"), cache_size=2)
    for name in ("b1", "b2", "b3"):
        await make_binding(name, tenant_id="t-cache")
    assert set(await lookup.get(["b1", "b2", "nope"])) == {"b1", "b2"}
    await make_binding("nope", tenant_id="t-late")  # committed a moment later: found, not a cached miss
    assert (await lookup.get(["nope"]))["nope"].tenant_id == "t-late"
    # LRU of 2: "b2" and "nope" now; b1 was evicted and is read from Redis again.
    redis_sync.delete(binding_key("b1"), binding_key("nope"))
    found = await lookup.get(["b1", "nope"])
    assert set(found) == {"nope"}  # "nope" served from the cache, b1 gone from Redis and from the cache
