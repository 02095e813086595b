"""Limits against a hostile caller: each answers RESOURCE_EXHAUSTED or INVALID_ARGUMENT naming its setting or
field, and the service stays healthy (health SERVING, the next ordinary call answered)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from cdr.conftest import bucket_of
from grpc_health.v1 import health_pb2, health_pb2_grpc

from numprotect.cdr.v1 import cdr_pb2

X = "700100000000001"
X2 = "700100000000002"


async def assert_healthy(cdr: Any, make_record: Any) -> None:
    health = health_pb2_grpc.HealthStub(cdr.svc.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service="numprotect.cdr.v1.CdrService"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    ordinary = await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=[make_record("after-the-limit")]))
    assert ordinary.accepted + ordinary.duplicates == 1


async def _stream_of(records: list[cdr_pb2.CallDetailRecord]) -> AsyncIterator[cdr_pb2.StreamCdrsRequest]:
    for record in records:
        yield cdr_pb2.StreamCdrsRequest(record=record)


def _exhausted(raised: pytest.ExceptionInfo[grpc.aio.AioRpcError], setting: str) -> None:
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert setting in (raised.value.details() or "")


async def test_a_stream_longer_than_the_limit_is_refused_naming_it(
    cdr_service: Any, make_record: Any, make_binding: Any, redis_sync: Any
) -> None:
    await make_binding("b1", tenant_id="t1")  # records matched by binding_id: one lookup per chunk, not per record
    async with cdr_service(NUMPROTECT_CDR_MAX_STREAM_RECORDS="600") as cdr:
        within = await cdr.carrier.StreamCdrs(_stream_of([make_record(f"s{i}", binding_id="b1") for i in range(600)]))
        assert within.accepted == 600
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await cdr.carrier.StreamCdrs(_stream_of([make_record(f"l{i}", binding_id="b1") for i in range(601)]))
        _exhausted(raised, "NUMPROTECT_CDR_MAX_STREAM_RECORDS")
        # The refused stream's first chunk (500) was stored before the limit; the rest never was.
        assert redis_sync.xlen(bucket_of(redis_sync, "t1").stream) == 600 + 500
        await assert_healthy(cdr, make_record)


async def test_more_rejected_records_than_the_limit_are_refused_naming_it(
    cdr_service: Any, make_record: Any, redis_sync: Any
) -> None:
    async with cdr_service(NUMPROTECT_CDR_MAX_REJECTED="3") as cdr:
        three_bad = [make_record(f"bad{i}", release_cause=200) for i in range(3)] + [make_record("good")]
        reply = await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=three_bad))
        assert (reply.accepted, len(reply.rejected)) == (1, 3)
        four_bad = [make_record(f"worse{i}", release_cause=200) for i in range(4)] + [make_record("good2")]
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=four_bad))
        _exhausted(raised, "NUMPROTECT_CDR_MAX_REJECTED")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await cdr.carrier.StreamCdrs(_stream_of(four_bad))
        _exhausted(raised, "NUMPROTECT_CDR_MAX_REJECTED")
        listed = await cdr.operator.ListCdrs(cdr_pb2.ListCdrsRequest(unmatched=True))
        assert [r.call_id for r in listed.records] == ["good"]  # nothing of a refused call was stored
        await assert_healthy(cdr, make_record)


async def test_a_batch_over_the_limit_names_the_setting(cdr_service: Any, make_record: Any) -> None:
    async with cdr_service(NUMPROTECT_CDR_MAX_BATCH="4") as cdr:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=[make_record(f"c{i}") for i in range(5)]))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "NUMPROTECT_CDR_MAX_BATCH" in (raised.value.details() or "")
        await assert_healthy(cdr, make_record)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"binding_id": "b" * 129}, "binding_id"),
        ({"binding_id": "b x"}, "binding_id"),
        ({"out_order_id": "o" * 129}, "out_order_id"),
        ({"out_order_id": "o*"}, "out_order_id"),
    ],
)
async def test_list_ids_that_would_name_a_redis_key_are_bounded(
    cdr_service: Any, make_record: Any, fields: dict[str, Any], field: str
) -> None:
    async with cdr_service() as cdr:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await cdr.tenant("t1").ListCdrs(cdr_pb2.ListCdrsRequest(**fields))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (raised.value.details() or "")
        await assert_healthy(cdr, make_record)


async def test_abuse_signals_report_at_most_the_limit_per_window(
    cdr_service: Any, make_record: Any, make_binding: Any, now_ms: int
) -> None:
    await make_binding("b1", tenant_id="t1")
    await make_binding("b2", tenant_id="t1", virtual_number=X2)
    records = []
    # Three flagged callers on X with 2, 3 and 4 unanswered calls; three more on X2 with 2 calls each.
    for caller, count in (("13711110001", 2), ("13711110002", 3), ("13711110003", 4)):
        records += [
            make_record(f"{caller}-{i}", binding_id="b1", calling_number=caller, answered_s=None, call_ms=now_ms - 1000)
            for i in range(count)
        ]
    for caller in ("13722220001", "13722220002", "13722220003"):
        records += [
            make_record(
                f"{caller}-{i}",
                binding_id="b2",
                called_number=X2,
                calling_number=caller,
                answered_s=None,
                call_ms=now_ms - 1000,
            )
            for i in range(2)
        ]
    settings = {"NUMPROTECT_CDR_ABUSE_MIN_CALLS": "2", "NUMPROTECT_CDR_MAX_ABUSE_SIGNALS": "2"}
    async with cdr_service(**settings) as cdr:
        assert (await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=records))).accepted == len(records)
        tenant = cdr.tenant("t1")
        flagged = (await tenant.GetAbuseSignals(cdr_pb2.GetAbuseSignalsRequest())).signals
        # One number with more callers than the limit: its counter hash (9 fields) is read by a bounded scan.
        per_number = (await tenant.GetAbuseSignals(cdr_pb2.GetAbuseSignalsRequest(virtual_number=X))).signals
        await assert_healthy(cdr, make_record)
        everything = {
            "NUMPROTECT_CDR_ABUSE_MIN_CALLS": "2",
            "NUMPROTECT_CDR_MAX_ABUSE_SIGNALS": "10",
            "NUMPROTECT_CDR_WATCH_BLOCK": "200ms",
        }
    async with cdr_service(**everything) as unbounded:
        tenant = unbounded.tenant("t1")
        all_flagged = (await tenant.GetAbuseSignals(cdr_pb2.GetAbuseSignalsRequest())).signals
        all_per_number = (await tenant.GetAbuseSignals(cdr_pb2.GetAbuseSignalsRequest(virtual_number=X))).signals
    # What the limit cut (the number's callers now include assert_healthy's ordinary call, not flagged).
    assert len(all_flagged) == 6 and len(all_per_number) == 4
    # The current window only (the calls are a second old): two pairs, those with the most bad calls.
    assert sorted((s.virtual_number, s.unanswered_calls) for s in flagged) == [(X, 3), (X, 4)]
    assert len(per_number) == 2
    assert all(s.virtual_number == X and s.total_calls in (2, 3, 4) for s in per_number)


async def test_watch_streams_per_tenant_are_bounded_and_given_back(
    cdr_service: Any, make_record: Any, make_binding: Any
) -> None:
    async with cdr_service(NUMPROTECT_CDR_MAX_WATCHERS_PER_TENANT="2") as cdr:
        slots = cdr.servicer.watch_slots
        tenant = cdr.tenant("t1")
        open_watches = [tenant.WatchCdrs(cdr_pb2.WatchCdrsRequest(cursor="")) for _ in range(2)]
        readers = [asyncio.ensure_future(call.read()) for call in open_watches]
        deadline = asyncio.get_running_loop().time() + 10
        while slots.held("tenant:t1") < 2:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await tenant.WatchCdrs(cdr_pb2.WatchCdrsRequest(cursor="")).read()
        _exhausted(raised, "NUMPROTECT_CDR_MAX_WATCHERS_PER_TENANT")
        # Another tenant and the operator have slots of their own.
        others = [
            cdr.tenant("t2").WatchCdrs(cdr_pb2.WatchCdrsRequest(cursor="")),
            cdr.operator.WatchCdrs(cdr_pb2.WatchCdrsRequest(tenant_id="t1", cursor="")),
        ]
        other_readers = [asyncio.ensure_future(call.read()) for call in others]
        while slots.held("tenant:t2") < 1 or slots.held("operator:") < 1:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        assert slots.held("tenant:t1") == 2
        # A cancelled watch gives its slot back: the tenant may open one again.
        open_watches[0].cancel()
        while slots.held("tenant:t1") > 1:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        replacement = tenant.WatchCdrs(cdr_pb2.WatchCdrsRequest(cursor=""))
        replacement_reader = asyncio.ensure_future(replacement.read())
        while slots.held("tenant:t1") < 2:
            assert not replacement_reader.done(), "the replacement watch was refused"
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        for call in [*open_watches, *others, replacement]:
            call.cancel()
        await asyncio.gather(*readers, *other_readers, replacement_reader, return_exceptions=True)
        while slots.held("tenant:t1") or slots.held("tenant:t2") or slots.held("operator:"):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        await assert_healthy(cdr, make_record)
