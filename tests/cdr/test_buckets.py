"""A tenant's records spread over buckets (NUMPROTECT_CDR_STREAM_BUCKETS): each bucket its own slot (on the cluster,
its own primary), a record's bucket that of its virtual number (so of its binding); ingest exactly once with one
script call per bucket per batch; WatchCdrs merged over the buckets, in order per binding and resumable; listing,
counters and abuse signals over every bucket; owners from before buckets keep their one stream, cursors and page
tokens. Each runs standalone and in the cluster pass of make test."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
from collections import defaultdict
from typing import Any

import grpc
import pytest
from cdr.conftest import now_ms
from cdr.test_query import _list_all, _take
from redis.cluster import RedisCluster

from numprotect.cdr.v1 import cdr_pb2
from numprotect.core.cdr_keys import Bucket, Buckets, count_key, slot_of
from numprotect.services.cdr.store import BEIJING
from numprotect.services.cdr.watch import CURSOR_PREFIX
from support.redis_cluster import RedisClusterServers
from support.rpc import fails

BUCKETS = 3
SPREAD = {"NUMPROTECT_CDR_STREAM_BUCKETS": str(BUCKETS)}
ONE_STREAM = {"NUMPROTECT_CDR_STREAM_BUCKETS": "1"}
TOKEN_KEY = {"NUMPROTECT_PAGE_TOKEN_KEY": base64.b64encode(b"cdr-bucket-test-key-32-bytes-long").decode()}
# Numbers of X's block (which the test carrier routes): one binding on each.
NUMBERS = [f"70010000000{i:04d}" for i in range(1, 13)]
MINUTE = 60_000


async def _bindings(make_binding: Any, tenant_id: str, count: int = len(NUMBERS)) -> list[str]:
    ids = []
    for i, number in enumerate(NUMBERS[:count]):
        await make_binding(f"{tenant_id}-b{i}", tenant_id=tenant_id, virtual_number=number, out_order_id=f"o{i}")
        ids.append(f"{tenant_id}-b{i}")
    return ids


def _round(make_record: Any, tenant_id: str, n: int, base_ms: int, count: int = len(NUMBERS)) -> list[Any]:
    """Round n: one record per binding, call ids "<binding>-<n>", call times in n's minute."""
    return [
        make_record(
            f"{tenant_id}-b{i}-{n}",
            binding_id=f"{tenant_id}-b{i}",
            called_number=number,
            call_ms=base_ms + n * MINUTE + i,
        )
        for i, number in enumerate(NUMBERS[:count])
    ]


def _stored(redis_sync: Any, bucket: Bucket) -> list[cdr_pb2.CallDetailRecord]:
    return [cdr_pb2.CallDetailRecord.FromString(fields[b"p"]) for _, fields in redis_sync.xrange(bucket.stream)]


def _script_calls(redis_sync: Any) -> int:
    """EVALSHA calls Redis has served so far (every primary of a cluster)."""
    infos: list[Any]
    if isinstance(redis_sync, RedisCluster):
        infos = list(redis_sync.info("commandstats", target_nodes=RedisCluster.PRIMARIES).values())
    else:
        infos = [redis_sync.info("commandstats")]
    return sum(info.get("cmdstat_evalsha", {}).get("calls", 0) for info in infos)


async def test_a_tenants_records_spread_over_buckets_on_their_own_slots_one_script_call_per_bucket(
    cdr_service: Any,
    make_record: Any,
    make_binding: Any,
    redis_sync: Any,
    redis_cluster_servers: RedisClusterServers | None,
) -> None:
    await _bindings(make_binding, "t-spread")
    base = now_ms() - 30 * MINUTE
    async with cdr_service(**SPREAD) as cdr:
        first = await cdr.carrier.IngestCdrs(
            cdr_pb2.IngestCdrsRequest(records=_round(make_record, "t-spread", 0, base))
        )
        before = _script_calls(redis_sync)
        second = await cdr.carrier.IngestCdrs(
            cdr_pb2.IngestCdrsRequest(records=[r for n in (1, 2) for r in _round(make_record, "t-spread", n, base)])
        )
        script_calls = _script_calls(redis_sync) - before
        listed = (await cdr.tenant("t-spread").ListCdrs(cdr_pb2.ListCdrsRequest(tenant_id="t-spread"))).records
        stats = await cdr.tenant("t-spread").GetCdrStats(cdr_pb2.GetCdrStatsRequest(tenant_id="t-spread"))
    assert (first.accepted, second.accepted) == (12, 24)
    # The bindings (and the bucket count) were read by the first batch: the second is one ingest script per bucket.
    assert script_calls == BUCKETS
    assert redis_sync.get(count_key("t-spread")) == str(BUCKETS).encode()
    buckets = Buckets.of("t-spread", BUCKETS)
    per_bucket = {bucket.index: _stored(redis_sync, bucket) for bucket in buckets.all}
    assert all(per_bucket.values())  # 12 numbers: every bucket has records
    assert sum(len(records) for records in per_bucket.values()) == 36
    for index, records in per_bucket.items():
        assert {buckets.for_number(r.called_number).index for r in records} == {index}
        for record in records:  # its dedup key is in its bucket's slot, holding its stream id
            assert redis_sync.get(buckets.all[index].dedup(cdr.carrier_id, record.call_id)) is not None
    assert len({slot_of(bucket.tag) for bucket in buckets.all}) == BUCKETS
    if redis_cluster_servers is not None:  # 3 masters: each bucket on its own primary
        assert len({redis_cluster_servers.master_of(bucket.stream).port for bucket in buckets.all}) == BUCKETS
    assert len(listed) == 36
    times = [r.call_time.ToMilliseconds() for r in listed]
    assert times == sorted(times)
    assert stats.calls == 36


async def test_watch_delivers_each_bindings_records_in_order_across_a_resume_mid_stream(
    cdr_service: Any, make_record: Any, make_binding: Any
) -> None:
    bindings = await _bindings(make_binding, "t-watch", 8)
    base = now_ms() - 30 * MINUTE
    async with cdr_service(**SPREAD) as cdr:
        for n in range(5):  # one batch per round: each binding's records in order, spread over the buckets
            await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=_round(make_record, "t-watch", n, base, 8)))
        tenant = cdr.tenant("t-watch")
        call = tenant.WatchCdrs(cdr_pb2.WatchCdrsRequest(tenant_id="t-watch", cursor="0"))
        first = await asyncio.wait_for(_take(call, 17), timeout=10)
        call.cancel()  # the client goes away in the middle of the buckets' batches

        async def more_later() -> None:
            await asyncio.sleep(0.3)  # while the resumed watch blocks on every bucket
            for n in range(5, 7):
                records = _round(make_record, "t-watch", n, base, 8)
                await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=records))
            # A resend of an earlier round: duplicates, nothing delivered again.
            await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=_round(make_record, "t-watch", 2, base, 8)))

        sender = asyncio.create_task(more_later())
        resumed = tenant.WatchCdrs(cdr_pb2.WatchCdrsRequest(tenant_id="t-watch", cursor=first[-1].cursor))
        rest = await asyncio.wait_for(_take(resumed, 7 * 8 - 17), timeout=15)
        await sender
        # Nothing more comes: no record is delivered twice after the resume.
        extra = tenant.WatchCdrs(cdr_pb2.WatchCdrsRequest(tenant_id="t-watch", cursor=rest[-1].cursor))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(_take(extra, 1), timeout=1)
        extra.cancel()
    delivered = [m.record.call_id for m in first + rest]
    assert sorted(delivered) == sorted(f"{b}-{n}" for b in bindings for n in range(7))  # each once
    rounds: dict[str, list[int]] = defaultdict(list)
    for call_id in delivered:
        binding, _, round_number = call_id.rpartition("-")
        rounds[binding].append(int(round_number))
    assert all(rounds[b] == list(range(7)) for b in bindings), rounds  # in order per binding, across the resume
    assert all(m.cursor.startswith(CURSOR_PREFIX) for m in first + rest)
    assert len({m.cursor for m in first + rest}) == len(delivered)


async def test_duplicate_batches_sent_concurrently_store_each_call_once_in_its_bucket(
    cdr_service: Any, make_record: Any, make_binding: Any, redis_sync: Any
) -> None:
    await _bindings(make_binding, "t-dup")
    base = now_ms() - 30 * MINUTE
    records = [r for n in range(4) for r in _round(make_record, "t-dup", n, base)]
    async with cdr_service(**SPREAD) as cdr:

        async def sender(seed: int) -> Any:
            order = records[seed:] + records[:seed]  # every sender its own order: races on each call_id
            return await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=order))

        replies = await asyncio.gather(*(sender(seed * 5) for seed in range(8)))
        again = await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=records))
        listed = (
            await cdr.tenant("t-dup").ListCdrs(cdr_pb2.ListCdrsRequest(tenant_id="t-dup", page_size=1000))
        ).records
    assert sum(r.accepted for r in replies) == len(records)
    assert sum(r.duplicates for r in replies) == 7 * len(records)
    assert (again.accepted, again.duplicates) == (0, len(records))
    assert sorted(r.call_id for r in listed) == sorted(r.call_id for r in records)
    buckets = Buckets.of("t-dup", BUCKETS)
    stored = 0
    for bucket in buckets.all:
        entries = redis_sync.xrange(bucket.stream)
        stored += len(entries)
        for entry_id, fields in entries:
            record = cdr_pb2.CallDetailRecord.FromString(fields[b"p"])
            assert redis_sync.get(bucket.dedup(cdr.carrier_id, record.call_id)) == entry_id
    assert stored == len(records)


async def test_listing_counters_and_signals_over_buckets_answer_as_one_stream_does(
    cdr_service: Any, make_record: Any, make_binding: Any
) -> None:
    """The same records in a tenant of one stream and in a tenant of 3 buckets: the same listings (every page size,
    each filter), counters and abuse signals."""
    base = now_ms() - 240 * MINUTE  # past the abuse windows: only the short calls below are counted
    short = {"answered_s": 1, "call_ms": now_ms() - 1000}
    day = dt.datetime.fromtimestamp(base / 1000, BEIJING).date().isoformat()
    # That day's calls: the 36 of the rounds (30 s each), and the 12 short ones (1 s) if they are on it too.
    on_day = 36 + (12 if dt.datetime.fromtimestamp(short["call_ms"] / 1000, BEIJING).date().isoformat() == day else 0)
    expected_stats = (on_day, on_day, 36 * 30 + (on_day - 36))
    answers: dict[str, Any] = {}
    for tenant, settings in (("t-one", ONE_STREAM), ("t-three", SPREAD)):
        await _bindings(make_binding, tenant)
        # Many records share a call time, within a bucket and across buckets (ties are ordered by stream id).
        records = [r for n in range(3) for r in _round(make_record, tenant, n, base)]
        for r in records:
            r.call_time.FromMilliseconds(base + (r.call_time.ToMilliseconds() - base) // MINUTE * MINUTE)
        # Short calls on 3 numbers (3 buckets): each (number, caller) pair is flagged on its own calls.
        records += [
            make_record(f"{tenant}-short-{i}-{j}", binding_id=f"{tenant}-b{i}", called_number=NUMBERS[i], **short)
            for i in range(3)
            for j in range(4)
        ]
        abuse = {"NUMPROTECT_CDR_ABUSE_MIN_CALLS": "3", "NUMPROTECT_CDR_ABUSE_SHORT_CALL": "3s"}
        async with cdr_service(**settings, **abuse) as cdr:
            assert (await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=records))).accepted == 48
            stub = cdr.tenant(tenant)
            listings = {}
            filters: dict[str, dict[str, str]] = {"all": {}, "binding": {"binding_id": f"{tenant}-b4"}}
            filters["order"] = {"out_order_id": "o7"}
            for page_size in (1, 5, 1000):
                for name, fields in filters.items():
                    listings[(page_size, name)] = await _list_all(stub, page_size, tenant_id=tenant, **fields)
            start, end = cdr_pb2.ListCdrsRequest().start_time, cdr_pb2.ListCdrsRequest().end_time
            start.FromMilliseconds(base + MINUTE)
            end.FromMilliseconds(base + 2 * MINUTE)
            listings[(2, "window")] = await _list_all(stub, 2, tenant_id=tenant, start_time=start, end_time=end)
            stats = await stub.GetCdrStats(cdr_pb2.GetCdrStatsRequest(tenant_id=tenant, date=day))
            flagged = await stub.GetAbuseSignals(cdr_pb2.GetAbuseSignalsRequest(tenant_id=tenant))
            one_number = await stub.GetAbuseSignals(
                cdr_pb2.GetAbuseSignalsRequest(tenant_id=tenant, virtual_number=NUMBERS[1])
            )
        answers[tenant] = (listings, stats, list(flagged.signals), list(one_number.signals))
    one, three = answers["t-one"], answers["t-three"]
    assert len(one[0][(1, "all")]) == 48 and len(one[0][(2, "window")]) == 12
    assert [r.call_id for r in one[0][(1, "binding")]] == [f"t-one-b4-{n}" for n in range(3)]
    for key, listed in one[0].items():
        other = three[0][key]
        # The same records, in call-time order (ties in stream-id order, which differs between the two layouts).
        assert sorted(r.call_id[6:] for r in listed) == sorted(r.call_id[8:] for r in other), key
        assert [r.call_time.ToMilliseconds() for r in listed] == [r.call_time.ToMilliseconds() for r in other], key
    assert (one[1].calls, one[1].answered, one[1].billable_seconds) == expected_stats
    assert (three[1].calls, three[1].answered, three[1].billable_seconds) == expected_stats
    assert three[2] == one[2]
    assert sorted((s.virtual_number, s.total_calls, s.short_calls, s.flagged) for s in three[2]) == [
        (NUMBERS[i], 4, 4, True) for i in range(3)
    ]
    assert three[3] == one[3] and [(s.virtual_number, s.total_calls) for s in three[3]] == [(NUMBERS[1], 4)]


async def test_an_owner_from_before_buckets_keeps_its_stream_its_cursors_and_its_page_tokens(
    cdr_service: Any, make_record: Any, make_binding: Any, redis_sync: Any
) -> None:
    await _bindings(make_binding, "t-old", 4)
    base = now_ms() - 30 * MINUTE
    async with cdr_service(**ONE_STREAM, **TOKEN_KEY) as old:
        for n in range(3):
            await old.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=_round(make_record, "t-old", n, base, 4)))
        redis_sync.delete(count_key("t-old"))  # as a build from before buckets left it: a stream, no count
        page = await old.tenant("t-old").ListCdrs(cdr_pb2.ListCdrsRequest(tenant_id="t-old", page_size=5))
        call = old.tenant("t-old").WatchCdrs(cdr_pb2.WatchCdrsRequest(tenant_id="t-old", cursor="0"))
        watched = await asyncio.wait_for(_take(call, 7), timeout=10)
        call.cancel()
    assert watched[-1].cursor.count("-") == 1 and not watched[-1].cursor.startswith(CURSOR_PREFIX)  # a stream id
    async with cdr_service(**SPREAD, **TOKEN_KEY) as new:
        for n in range(3, 5):
            await new.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=_round(make_record, "t-old", n, base, 4)))
        stub = new.tenant("t-old")
        rest = await _list_all_after(stub, page.next_page_token)
        resumed = stub.WatchCdrs(cdr_pb2.WatchCdrsRequest(tenant_id="t-old", cursor=watched[-1].cursor))
        watched_rest = await asyncio.wait_for(_take(resumed, 20 - 7), timeout=10)
        resumed.cancel()
        # A new tenant in the same process gets the buckets.
        await _bindings(make_binding, "t-young", 1)
        await new.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=_round(make_record, "t-young", 0, base, 1)))
    assert redis_sync.get(count_key("t-old")) == b"1"  # its stream existed: it stays one bucket
    assert redis_sync.xlen(Bucket("t-old").stream) == 20
    assert redis_sync.get(count_key("t-young")) == str(BUCKETS).encode()
    listed = [r.call_id for r in page.records] + [r.call_id for r in rest]
    assert sorted(listed) == sorted(f"t-old-b{i}-{n}" for i in range(4) for n in range(5))
    assert [m.record.call_id for m in watched + watched_rest] == [f"t-old-b{i}-{n}" for n in range(5) for i in range(4)]
    assert all(not m.cursor.startswith(CURSOR_PREFIX) for m in watched_rest)


async def _list_all_after(stub: Any, token: str) -> list[cdr_pb2.CallDetailRecord]:
    out: list[cdr_pb2.CallDetailRecord] = []
    while token:
        reply = await stub.ListCdrs(cdr_pb2.ListCdrsRequest(tenant_id="t-old", page_size=5, page_token=token))
        out.extend(reply.records)
        token = reply.next_page_token
    return out


async def test_a_watch_begun_before_a_new_tenants_first_record_reads_every_bucket_it_gets(
    cdr_service: Any, make_record: Any, make_binding: Any, redis_sync: Any
) -> None:
    await _bindings(make_binding, "t-first")
    async with cdr_service(**SPREAD) as cdr:
        assert redis_sync.get(count_key("t-first")) is None
        call = cdr.tenant("t-first").WatchCdrs(cdr_pb2.WatchCdrsRequest(tenant_id="t-first", cursor=""))
        reader = asyncio.create_task(_take(call, 24))
        await asyncio.sleep(0.3)  # the watch reads bucket 0 alone: no count is stored yet
        base = now_ms() - 30 * MINUTE
        for n in range(2):
            await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=_round(make_record, "t-first", n, base)))
        got = await asyncio.wait_for(reader, timeout=10)
        call.cancel()
    assert sorted(m.record.call_id for m in got) == sorted(f"t-first-b{i}-{n}" for i in range(12) for n in range(2))
    assert got[-1].cursor.startswith(CURSOR_PREFIX)


async def test_a_watch_takes_a_place_per_bucket_and_cursors_of_another_count_are_refused(
    cdr_service: Any, make_record: Any, make_binding: Any
) -> None:
    await _bindings(make_binding, "t-places", 1)
    base = now_ms() - 30 * MINUTE
    async with cdr_service(**SPREAD, NUMPROTECT_CDR_MAX_WATCHERS=str(BUCKETS + 1)) as cdr:
        await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=_round(make_record, "t-places", 0, base, 1)))
        stub = cdr.tenant("t-places")
        first = stub.WatchCdrs(cdr_pb2.WatchCdrsRequest(tenant_id="t-places", cursor="0"))
        got = await asyncio.wait_for(_take(first, 1), timeout=10)
        error = await fails(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            _take(stub.WatchCdrs(cdr_pb2.WatchCdrsRequest(tenant_id="t-places", cursor="0")), 1),
        )
        assert "NUMPROTECT_CDR_MAX_WATCHERS" in (error.details() or "")
        four = CURSOR_PREFIX + base64.urlsafe_b64encode(bytes([4] + [0] * 8)).decode().rstrip("=")
        first.cancel()
        error = await fails(
            grpc.StatusCode.INVALID_ARGUMENT,
            _take(stub.WatchCdrs(cdr_pb2.WatchCdrsRequest(tenant_id="t-places", cursor=four)), 1),
        )
        assert "cursor" in (error.details() or "")
    assert got[0].record.call_id == "t-places-b0-0"
