"""ListCdrs (indexes, pages, tokens), WatchCdrs (cursors, resume with no gap and no repeat), GetCdrStats and
GetAbuseSignals."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import grpc
import pytest

from numprotect.cdr.v1 import cdr_pb2
from numprotect.services.cdr.store import BEIJING

X = "700100000000001"
X2 = "700100000000002"
MINUTE = 60_000


def _now_ms() -> int:
    import time

    return time.time_ns() // 1_000_000


async def _list_all(stub: Any, page_size: int, **filters: Any) -> list[cdr_pb2.CallDetailRecord]:
    out: list[cdr_pb2.CallDetailRecord] = []
    token = ""
    while True:
        reply = await stub.ListCdrs(cdr_pb2.ListCdrsRequest(page_size=page_size, page_token=token, **filters))
        assert len(reply.records) <= page_size
        out.extend(reply.records)
        token = reply.next_page_token
        if not token:
            return out


async def test_list_pages_through_indexes_by_binding_order_and_time(
    cdr_service: Any, make_record: Any, make_binding: Any
) -> None:
    await make_binding("b1", tenant_id="t1", out_order_id="o1")
    await make_binding("b2", tenant_id="t1", out_order_id="o2", virtual_number=X2)
    base = _now_ms() - 60 * MINUTE
    records = [make_record(f"b1-{i}", binding_id="b1", call_ms=base + (i % 7) * MINUTE) for i in range(25)]
    records += [make_record(f"b2-{i}", binding_id="b2", called_number=X2, call_ms=base + i * MINUTE) for i in range(10)]
    async with cdr_service() as cdr:
        assert (await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=records))).accepted == 35
        everything = await _list_all(cdr.tenant("t1"), 4, tenant_id="t1")
        assert sorted(r.call_id for r in everything) == sorted(r.call_id for r in records)
        times = [r.call_time.ToMilliseconds() for r in everything]
        assert times == sorted(times)  # call-time order; ties (same ms) do not repeat or vanish across pages
        by_binding = await _list_all(cdr.tenant("t1"), 3, tenant_id="t1", binding_id="b1")
        assert sorted(r.call_id for r in by_binding) == sorted(f"b1-{i}" for i in range(25))
        by_order = await _list_all(cdr.tenant("t1"), 1000, tenant_id="t1", out_order_id="o2")
        assert [r.call_id for r in by_order] == [f"b2-{i}" for i in range(10)]
        both = await _list_all(cdr.tenant("t1"), 50, tenant_id="t1", binding_id="b1", out_order_id="o2")
        assert both == []
        start, end = cdr_pb2.ListCdrsRequest().start_time, cdr_pb2.ListCdrsRequest().end_time
        start.FromMilliseconds(base + 2 * MINUTE)
        end.FromMilliseconds(base + 5 * MINUTE)
        window = await _list_all(cdr.tenant("t1"), 2, tenant_id="t1", binding_id="b2", start_time=start, end_time=end)
        assert [r.call_id for r in window] == ["b2-2", "b2-3", "b2-4"]  # start inclusive, end exclusive
        assert await _list_all(cdr.tenant("t-none"), 10, tenant_id="t-none") == []


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"tenant_id": ""}, "tenant_id"),
        ({"tenant_id": "t1", "unmatched": True}, "tenant_id"),
        ({"tenant_id": "t1", "page_size": 1001}, "page_size"),
        ({"tenant_id": "t1", "page_size": -1}, "page_size"),
        ({"tenant_id": "t1", "page_token": "garbage!"}, "page_token"),
        ({"unmatched": True, "binding_id": "b1"}, "binding_id"),
        ({"tenant_id": "a{b}"}, "tenant_id"),  # the platform's one tenant-id rule (no hash-tag braces)
        ({"tenant_id": "t" * 65}, "tenant_id"),
        ({"tenant_id": "t1", "end_time": {"seconds": 10**12}}, "end_time"),  # past 9999: not INTERNAL
        ({"tenant_id": "t1", "start_time": {"seconds": 253_402_300_800}}, "start_time"),
        ({"tenant_id": "t1", "start_time": {"nanos": -1}}, "start_time"),
        ({"tenant_id": "t1", "end_time": {"seconds": 5, "nanos": 1_000_000_000}}, "end_time"),
        ({"tenant_id": "t1", "binding_id": "\uff42\uff11"}, "binding_id"),  # non-ASCII: once INTERNAL
        ({"tenant_id": "t1", "binding_id": "b\u00e9"}, "binding_id"),
        ({"tenant_id": "t1", "binding_id": "b 1"}, "binding_id"),
        ({"tenant_id": "t1", "binding_id": "b\x001"}, "binding_id"),
        ({"tenant_id": "t1", "binding_id": "b" * 65536}, "binding_id"),
        ({"tenant_id": "t1", "out_order_id": "o\u00e9"}, "out_order_id"),
        ({"tenant_id": "t\u00e9"}, "tenant_id"),
    ],
)
async def test_list_rejects_bad_requests(cdr_service: Any, request_fields: dict[str, Any], field: str) -> None:
    async with cdr_service() as cdr:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await cdr.operator.ListCdrs(cdr_pb2.ListCdrsRequest(**request_fields))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (raised.value.details() or "")


async def test_a_page_token_only_continues_its_own_listing(
    cdr_service: Any, make_record: Any, make_binding: Any
) -> None:
    await make_binding("b1", tenant_id="t1")
    async with cdr_service() as cdr:
        await cdr.carrier.IngestCdrs(
            cdr_pb2.IngestCdrsRequest(records=[make_record(f"c{i}", binding_id="b1") for i in range(3)])
        )
        first = await cdr.tenant("t1").ListCdrs(cdr_pb2.ListCdrsRequest(tenant_id="t1", page_size=1))
        assert first.next_page_token
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await cdr.tenant("t1").ListCdrs(
                cdr_pb2.ListCdrsRequest(tenant_id="t1", binding_id="b1", page_token=first.next_page_token)
            )
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "page_token" in (raised.value.details() or "")


async def _take(call: Any, count: int) -> list[cdr_pb2.WatchCdrsResponse]:
    out = []
    async for message in call:
        out.append(message)
        if len(out) == count:
            break
    return out


async def test_watch_resumes_after_a_disconnect_without_gap_or_repeat(
    cdr_service: Any, make_record: Any, make_binding: Any
) -> None:
    await make_binding("b1", tenant_id="t1")
    async with cdr_service() as cdr:
        await cdr.carrier.IngestCdrs(
            cdr_pb2.IngestCdrsRequest(records=[make_record(f"w{i}", binding_id="b1") for i in range(10)])
        )
        # Cursor "0": from the oldest retained record.
        call = cdr.tenant("t1").WatchCdrs(cdr_pb2.WatchCdrsRequest(tenant_id="t1", cursor="0"))
        first = await _take(call, 4)
        call.cancel()  # the client disconnects
        assert [m.record.call_id for m in first] == [f"w{i}" for i in range(4)]

        async def more_later() -> None:
            await asyncio.sleep(0.3)  # while the resumed watch blocks
            await cdr.carrier.IngestCdrs(
                cdr_pb2.IngestCdrsRequest(records=[make_record(f"w{i}", binding_id="b1") for i in range(8, 14)])
            )

        sender = asyncio.create_task(more_later())
        resumed = cdr.tenant("t1").WatchCdrs(cdr_pb2.WatchCdrsRequest(tenant_id="t1", cursor=first[-1].cursor))
        rest = await asyncio.wait_for(_take(resumed, 10), timeout=10)
        resumed.cancel()
        await sender
    call_ids = [m.record.call_id for m in first + rest]
    assert call_ids == [f"w{i}" for i in range(14)]  # w8, w9 came twice from the carrier: stored once
    cursors = [m.cursor for m in first + rest]
    assert len(set(cursors)) == len(cursors)


async def test_watch_from_now_sees_only_new_records_and_bad_cursors_are_refused(
    cdr_service: Any, make_record: Any
) -> None:
    async with cdr_service() as cdr:
        await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=[make_record("old")]))
        call = cdr.operator.WatchCdrs(cdr_pb2.WatchCdrsRequest(unmatched=True, cursor=""))
        reader = asyncio.create_task(_take(call, 1))
        await asyncio.sleep(0.3)
        await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=[make_record("new")]))
        got = await asyncio.wait_for(reader, timeout=10)
        call.cancel()
        assert [m.record.call_id for m in got] == ["new"]
        # Not stream ids Redis takes: Arabic-Indic digits and a part past 64 bits once answered INTERNAL.
        for cursor in ("yesterday", "\u0661-\u0661", "99999999999999999999-1", "1-18446744073709551616", "-1", "1-"):
            bad = cdr.tenant("t1").WatchCdrs(cdr_pb2.WatchCdrsRequest(tenant_id="t1", cursor=cursor))
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await _take(bad, 1)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, cursor
            assert "cursor" in (raised.value.details() or "")


async def test_daily_stats_count_calls_answered_and_billable_seconds_by_beijing_date(
    cdr_service: Any, make_record: Any, make_binding: Any
) -> None:
    await make_binding("b1", tenant_id="t1")
    # 2026-03-01 23:30 in Beijing is still 2026-03-01 15:30 UTC; 00:30 Beijing on the 2nd is 16:30 UTC on the 1st.
    day1 = int(dt.datetime(2026, 3, 1, 23, 30, tzinfo=BEIJING).timestamp() * 1000)
    day2 = int(dt.datetime(2026, 3, 2, 0, 30, tzinfo=BEIJING).timestamp() * 1000)
    records = [
        make_record("d1-a", binding_id="b1", call_ms=day1, answered_s=30.2),  # 31 s billed (rounded up)
        make_record("d1-b", binding_id="b1", call_ms=day1, answered_s=None),
        make_record("d2-a", binding_id="b1", call_ms=day2, answered_s=60),
    ]
    async with cdr_service(NUMPROTECT_CDR_RETENTION="3650d", NUMPROTECT_CDR_MAX_CLOCK_SKEW="1d") as cdr:
        await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=records))
        await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=records))  # duplicates count nothing
        one = await cdr.tenant("t1").GetCdrStats(cdr_pb2.GetCdrStatsRequest(tenant_id="t1", date="2026-03-01"))
        two = await cdr.tenant("t1").GetCdrStats(cdr_pb2.GetCdrStatsRequest(tenant_id="t1", date="2026-03-02"))
        today = await cdr.tenant("t1").GetCdrStats(cdr_pb2.GetCdrStatsRequest(tenant_id="t1"))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await cdr.tenant("t1").GetCdrStats(cdr_pb2.GetCdrStatsRequest(tenant_id="t1", date="2026-02-30"))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (one.date, one.calls, one.answered, one.billable_seconds) == ("2026-03-01", 2, 1, 31)
    assert (two.calls, two.answered, two.billable_seconds) == (1, 1, 60)
    assert today.date == dt.datetime.now(BEIJING).date().isoformat()


async def test_abuse_signal_flags_a_caller_with_many_short_or_unanswered_calls(
    cdr_service: Any, make_record: Any, make_binding: Any
) -> None:
    await make_binding("b1", tenant_id="t1", party_a="13900000002", party_b="13800000001")
    now = _now_ms()
    spammer, normal = "13711112222", "13800000001"
    spam = {"calling_number": spammer, "call_ms": now - 1000, "target_number": ""}
    records = [make_record(f"short-{i}", answered_s=1, **spam) for i in range(3)]
    records += [
        make_record(f"miss-{i}", answered_s=None, call_type=cdr_pb2.CALL_TYPE_INTERCEPTED, **spam) for i in range(2)
    ]
    records += [make_record(f"ok-{i}", calling_number=normal, answered_s=120, call_ms=now - 1000) for i in range(6)]
    settings = {"NUMPROTECT_CDR_ABUSE_MIN_CALLS": "5", "NUMPROTECT_CDR_ABUSE_SHORT_CALL": "3s"}
    async with cdr_service(**settings) as cdr:
        # The spammer's calls match no binding (AXB: not a party), the normal calls match b1 (tenant t1).
        await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=records))
        await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=records))
        flagged = (await cdr.operator.GetAbuseSignals(cdr_pb2.GetAbuseSignalsRequest(unmatched=True))).signals
        per_number = (
            await cdr.tenant("t1").GetAbuseSignals(cdr_pb2.GetAbuseSignalsRequest(tenant_id="t1", virtual_number=X))
        ).signals
        tenant_flagged = (
            await cdr.tenant("t1").GetAbuseSignals(cdr_pb2.GetAbuseSignalsRequest(tenant_id="t1"))
        ).signals
    assert len(flagged) == 1
    signal = flagged[0]
    assert (signal.virtual_number, signal.total_calls, signal.short_calls, signal.unanswered_calls) == (X, 5, 3, 2)
    assert signal.flagged
    assert signal.calling_number == "137****2222"  # masked
    assert signal.window_start.ToMilliseconds() <= now
    assert [(s.calling_number, s.total_calls, s.flagged) for s in per_number] == [("138****0001", 6, False)]
    assert list(tenant_flagged) == []


async def test_page_tokens_carry_over_between_replicas_with_one_key_and_no_further(
    cdr_service: Any, make_record: Any, make_binding: Any
) -> None:
    import base64

    key = {"NUMPROTECT_PAGE_TOKEN_KEY": base64.b64encode(b"cdr-test-key-of-thirty-two-bytes").decode()}
    await make_binding("b1", tenant_id="t1")
    async with cdr_service(**key) as cdr, cdr_service(**key) as replica:
        await cdr.carrier.IngestCdrs(
            cdr_pb2.IngestCdrsRequest(records=[make_record(f"c{i}", binding_id="b1") for i in range(3)])
        )
        first = await cdr.tenant("t1").ListCdrs(cdr_pb2.ListCdrsRequest(tenant_id="t1", page_size=2))
        rest = await replica.tenant("t1").ListCdrs(
            cdr_pb2.ListCdrsRequest(tenant_id="t1", page_size=2, page_token=first.next_page_token)
        )
        listed = [r.call_id for r in [*first.records, *rest.records]]
        assert sorted(listed) == ["c0", "c1", "c2"] and not rest.next_page_token
        with pytest.raises(grpc.aio.AioRpcError) as raised:  # another tenant's query
            await replica.operator.ListCdrs(cdr_pb2.ListCdrsRequest(tenant_id="t2", page_token=first.next_page_token))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "page_token" in (raised.value.details() or "")
    async with cdr_service() as own_random_key:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await own_random_key.tenant("t1").ListCdrs(
                cdr_pb2.ListCdrsRequest(tenant_id="t1", page_token=first.next_page_token)
            )
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
