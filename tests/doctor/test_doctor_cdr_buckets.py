"""The invariant checker on CDRs spread over buckets (NUMPROTECT_CDR_STREAM_BUCKETS): what the cdr service stored
is clean; a record in another bucket than its virtual number's, a bucket beyond the owner's count, a count key
that holds no count, and a record stored twice in one bucket are each reported alone, with their key."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from doctor.state import doctor_options

from numprotect.cdr.v1 import cdr_pb2, cdr_pb2_grpc
from numprotect.core.cdr_keys import Bucket, Buckets, count_key
from numprotect.core.doctor import scan_async
from numprotect.core.doctor.report import CDR_WRONG_BUCKET, DUPLICATE_CDR
from numprotect.core.identity.principal import Role
from numprotect.core.settings import RedisSettings
from numprotect.services.cdr.app import build as build_cdr
from support.inprocess import running_service

CARRIER = "cmcc"
BUCKETS = 3
# Numbers of one block (which CARRIER routes); no binding has them, so their records are the unmatched owner's.
NUMBERS = [f"70010000000{i:04d}" for i in range(1, 10)]


def _record(call_id: str, number: str) -> cdr_pb2.CallDetailRecord:
    start = time.time_ns() // 1_000_000 - 60_000
    record = cdr_pb2.CallDetailRecord(
        call_id=call_id,
        calling_number="13800000001",
        called_number=number,
        call_type=cdr_pb2.CALL_TYPE_PEER_TO_A,
        release_direction=cdr_pb2.RELEASE_DIRECTION_CALLER,
        release_cause=16,
        unconnected_cause=cdr_pb2.UNCONNECTED_CAUSE_NONE,
    )
    record.call_time.FromMilliseconds(start)
    record.release_time.FromMilliseconds(start + 20_000)
    return record


async def test_cdrs_in_buckets_are_clean_and_each_planted_bucket_violation_is_reported_alone(
    redis_env: dict[str, str], redis_sync: Any, doctor_redis: RedisSettings
) -> None:
    environ = {**redis_env, "NUMPROTECT_CDR_STREAM_BUCKETS": str(BUCKETS)}
    async with running_service("cdr", build_cdr, environ) as svc:
        svc.route(CARRIER, NUMBERS[0])
        carrier: Any = cdr_pb2_grpc.CdrServiceStub(svc.channel_as(Role.CARRIER, CARRIER))
        records = [_record(f"c{i}-{j}", number) for i, number in enumerate(NUMBERS) for j in range(2)]
        assert (await carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=records))).accepted == 18
    report = await scan_async(doctor_redis, doctor_options())
    assert report.clean, report.to_text()
    assert report.scanned["CDRs"] == 18

    buckets = Buckets.of("", BUCKETS)
    assert all(redis_sync.xlen(bucket.stream) for bucket in buckets.all)  # the records are in all three
    first, second = buckets.all[:2]
    _entry_id, fields = redis_sync.xrange(first.stream, count=1)[0]
    stored = cdr_pb2.CallDetailRecord.FromString(fields[b"p"])
    beyond = Bucket("", 5, 0)

    def into_another_bucket(r: Any) -> None:
        r.xadd(second.stream, {"p": fields[b"p"]})

    def into_a_bucket_beyond_the_count(r: Any) -> None:
        r.xadd(beyond.stream, {"p": fields[b"p"]})

    def spoil_the_count(r: Any) -> None:
        r.set(count_key(""), "many")

    def twice_in_its_bucket(r: Any) -> None:
        r.xadd(first.stream, {"p": fields[b"p"]})

    plants: list[tuple[str, Callable[[Any], None], list[str], set[tuple[str, str]]]] = [
        ("record in another bucket", into_another_bucket, [second.stream], {(CDR_WRONG_BUCKET, second.stream)}),
        (
            "bucket beyond the count",
            into_a_bucket_beyond_the_count,
            [beyond.stream],
            {(CDR_WRONG_BUCKET, beyond.stream)},
        ),
        (
            "count key without a count",
            spoil_the_count,
            [count_key("")],
            {(CDR_WRONG_BUCKET, bucket.stream) for bucket in buckets.all},
        ),
        (
            "record stored twice in its bucket",
            twice_in_its_bucket,
            [first.stream],
            {(DUPLICATE_CDR, first.dedup(CARRIER, stored.call_id))},
        ),
    ]
    for name, plant, touched, wanted in plants:
        saved = {key: (redis_sync.dump(key), redis_sync.pttl(key)) for key in touched}
        plant(redis_sync)
        try:
            report = await scan_async(doctor_redis, doctor_options())
            assert {(v.kind, v.key) for v in report.violations} == wanted, f"{name}: {report.to_text(examples=10)}"
            if plant is into_another_bucket:
                (violation,) = report.violations
                assert f"call {stored.call_id} on {stored.called_number} is in bucket 1" in violation.detail
        finally:
            for key, (dumped, ttl) in saved.items():
                redis_sync.delete(key)
                if dumped is not None:
                    redis_sync.restore(key, max(ttl, 0), dumped)
    assert (await scan_async(doctor_redis, doctor_options())).clean  # everything restored
