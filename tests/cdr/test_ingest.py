"""IngestCdrs and StreamCdrs: per-record validation, summaries that add up, exactly-once storage."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from cdr.conftest import bucket_of
from google.protobuf.timestamp_pb2 import Timestamp

from numprotect.cdr.v1 import cdr_pb2


def _summary_adds_up(reply: Any, sent: int) -> None:
    assert reply.accepted + reply.duplicates + len(reply.rejected) == sent


async def test_a_mixed_batch_accepts_the_good_and_rejects_the_bad_precisely(
    cdr_service: Any, make_record: Any, redis_sync: Any
) -> None:
    base = make_record("ok-0").call_time.ToMilliseconds()
    bad = {
        1: (make_record(""), "call_id", "is required"),
        2: (make_record("x" * 129), "call_id", "at most 128"),
        3: (make_record("sp ace"), "call_id", "visible ASCII"),
        4: (make_record("c4", called_number="13800000001"), "called_number", "700 number"),
        # Full-width digits: Translate and the blocklists refuse them too (phone.normalize_calling).
        5: (make_record("c5", calling_number="\uff11" * 11), "calling_number", "ASCII digits"),
        6: (make_record("c6", calling_number=""), "calling_number", "is required"),
        7: (make_record("c7", release_time=None), "release_time", "is required"),
        8: (make_record("c8", call_time=None), "call_time", "is required"),
        9: (make_record("c9", ring_time=base - 1), "ring_time", "must not be before call_time"),
        10: (make_record("c10", answer_time=base + 1000, ring_time=base + 5000), "answer_time", "ring_time"),
        11: (make_record("c11", release_cause=128), "release_cause", "0 to 127"),
        12: (make_record("c12", release_cause=-1), "release_cause", "0 to 127"),
        13: (make_record("c13", call_type=9), "call_type", "unknown value 9"),
        14: (make_record("c14", release_direction=7), "release_direction", "unknown value"),
        15: (make_record("c15", unconnected_cause=99), "unconnected_cause", "unknown value"),
        16: (make_record("c16", target_number="70010000000000"), "target_number", "700"),
        17: (make_record("c17", extension="12345"), "extension", "1 to 4 digits"),
        18: (make_record("c18", call_ms=base - 200 * 86_400_000), "call_time", "retention"),
        19: (make_record("c19", call_ms=base + 86_400_000), "call_time", "future"),
    }
    records = []
    for i in range(22):
        records.append(bad[i][0] if i in bad else make_record(f"ok-{i}"))
    # International callers are kept as written; +86 numbers are normalised.
    records[20].calling_number = "+4915112345678"
    records[21].calling_number = "+86 138-0000-0009"
    async with cdr_service() as cdr:
        reply = await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=records))
    _summary_adds_up(reply, len(records))
    assert reply.accepted == 3 and reply.duplicates == 0
    got = {r.index: r for r in reply.rejected}
    assert sorted(got) == sorted(bad)
    for index, (record, field, reason) in bad.items():
        assert got[index].field == field, (index, got[index])
        assert reason in got[index].reason, (index, got[index].reason)
        assert got[index].call_id == record.call_id[:128]
    # No binding matches these: they are kept in the unmatched bucket, not dropped.
    assert redis_sync.xlen(bucket_of(redis_sync, "").stream) == 3


async def test_oversized_batch_is_invalid_argument_naming_records(cdr_service: Any, make_record: Any) -> None:
    async with cdr_service(NUMPROTECT_CDR_MAX_BATCH="5") as cdr:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=[make_record(f"c{i}") for i in range(6)]))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "records" in (raised.value.details() or "")
        reply = await cdr.carrier.IngestCdrs(
            cdr_pb2.IngestCdrsRequest(records=[make_record(f"c{i}") for i in range(5)])
        )
        assert reply.accepted == 5


async def test_duplicates_within_and_across_batches_are_counted_not_stored(
    cdr_service: Any, make_record: Any, redis_sync: Any
) -> None:
    async with cdr_service() as cdr:
        first = await cdr.carrier.IngestCdrs(
            cdr_pb2.IngestCdrsRequest(records=[make_record("a"), make_record("b"), make_record("a")])
        )
        assert (first.accepted, first.duplicates, len(first.rejected)) == (2, 1, 0)
        again = await cdr.carrier.IngestCdrs(
            cdr_pb2.IngestCdrsRequest(records=[make_record("a"), make_record("c"), make_record("b", answered_s=99)])
        )
        assert (again.accepted, again.duplicates) == (1, 2)
    assert redis_sync.xlen(bucket_of(redis_sync, "").stream) == 3


async def test_stream_ingestion_gives_the_same_summary_with_stream_positions(
    cdr_service: Any, make_record: Any, redis_sync: Any
) -> None:
    records = [make_record(f"s{i}") for i in range(1200)]
    records[3] = make_record("s3", release_cause=200)
    records[1100] = make_record("s1100", calling_number="abc")
    records[700] = make_record("s5")  # repeats an earlier call_id (another chunk)

    async def requests() -> AsyncIterator[cdr_pb2.StreamCdrsRequest]:
        for record in records:
            yield cdr_pb2.StreamCdrsRequest(record=record)

    async with cdr_service(NUMPROTECT_CDR_MAX_BATCH="10") as cdr:
        reply = await cdr.carrier.StreamCdrs(requests())
    _summary_adds_up(reply, len(records))
    assert (reply.accepted, reply.duplicates) == (1197, 1)
    assert sorted((r.index, r.field) for r in reply.rejected) == [(3, "release_cause"), (1100, "calling_number")]
    assert redis_sync.xlen(bucket_of(redis_sync, "").stream) == 1197


async def test_a_storm_of_16_concurrent_senders_stores_each_call_exactly_once(
    cdr_service: Any, make_record: Any, make_binding: Any, redis_sync: Any
) -> None:
    await make_binding("b-storm", tenant_id="t-storm", out_order_id="o-storm")
    records = [make_record(f"storm-{i}", binding_id="b-storm") for i in range(300)]
    async with cdr_service() as cdr:

        async def sender(seed: int) -> Any:
            order = records[seed:] + records[:seed]  # every sender its own order: real races on each call_id
            return await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=order))

        replies = await asyncio.gather(*(sender(seed * 17) for seed in range(16)))
    for reply in replies:
        _summary_adds_up(reply, len(records))
        assert not reply.rejected
    assert sum(r.accepted for r in replies) == len(records)
    assert sum(r.duplicates for r in replies) == 15 * len(records)
    bucket = bucket_of(redis_sync, "t-storm")
    assert redis_sync.xlen(bucket.stream) == len(records)
    assert redis_sync.zcard(bucket.time_index) == len(records)
    assert redis_sync.zcard(bucket.binding_index("b-storm")) == len(records)
    assert redis_sync.zcard(bucket.order_index("o-storm")) == len(records)
    stored_ids = {entry[0] for entry in redis_sync.xrange(bucket.stream)}
    assert {redis_sync.get(bucket.dedup(cdr.carrier_id, f"storm-{i}")) for i in range(300)} == stored_ids
    assert int(redis_sync.hget(bucket.daily(_today(records[0])), "calls")) == len(records)


def _today(record: cdr_pb2.CallDetailRecord) -> str:
    from numprotect.services.cdr.store import beijing_date

    return beijing_date(record.call_time.ToMilliseconds())


async def test_a_batch_spanning_many_tenants_goes_to_each_tenants_bucket(
    cdr_service: Any, make_record: Any, make_binding: Any, redis_sync: Any
) -> None:
    tenants = [f"t{i}" for i in range(100)]
    for i, tenant in enumerate(tenants):
        await make_binding(f"b{i}", tenant_id=tenant)
    records = [make_record(f"m{i}-{j}", binding_id=f"b{i}") for i in range(100) for j in range(3)]
    async with cdr_service() as cdr:
        reply = await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=records))
    assert (reply.accepted, reply.duplicates, len(reply.rejected)) == (300, 0, 0)
    for tenant in tenants:
        assert redis_sync.xlen(bucket_of(redis_sync, tenant).stream) == 3


async def test_record_ids_must_be_printable_ascii_as_listing_them_requires(
    cdr_service: Any, make_record: Any, redis_sync: Any
) -> None:
    """A record's ids follow the rule ListCdrs checks them by: a non-ASCII binding_id was stored, and could then
    never be listed (ListCdrs answered INTERNAL for it)."""
    hostile = ["\uff42\uff11", "b\u00e9", "b 1", "b\x001", "b" * 129]
    records = [
        make_record(f"id-{field}-{i}", **{field: value})
        for field in ("binding_id", "tenant_id", "out_order_id")
        for i, value in enumerate(hostile)
    ]
    async with cdr_service() as cdr:
        reply = await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=records))
    assert reply.accepted == 0
    assert [r.field for r in reply.rejected] == [
        f for f in ("binding_id", "tenant_id", "out_order_id") for _ in hostile
    ]
    assert all("visible ASCII" in r.reason for r in reply.rejected)
    assert redis_sync.xlen(bucket_of(redis_sync, "").stream) == 0


async def test_record_times_no_timestamp_may_hold_are_rejected_naming_the_field(
    cdr_service: Any, make_record: Any
) -> None:
    bad_stamps = [
        Timestamp(seconds=0, nanos=-1),
        Timestamp(seconds=253_402_300_800),
        Timestamp(seconds=-62_135_596_801),
        Timestamp(seconds=1, nanos=1_000_000_000),
    ]
    fields = ("call_time", "ring_time", "answer_time", "release_time")
    records = []
    for field in fields:
        for i, stamp in enumerate(bad_stamps):
            record = make_record(f"t-{field}-{i}")
            getattr(record, field).CopyFrom(stamp)
            records.append(record)
    ignored = make_record("t-ingest-time")  # output-only: ignored and recomputed, whatever it holds
    ignored.ingest_time.CopyFrom(Timestamp(seconds=253_402_300_800))
    records.append(ignored)
    async with cdr_service() as cdr:
        reply = await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=records))
    assert reply.accepted == 1
    assert [r.field for r in reply.rejected] == [field for field in fields for _ in bad_stamps]
