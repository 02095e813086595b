"""Who may call the cdr service and what each caller sees: no key, the wrong role, another tenant, another
carrier's numbers; the carrier of a record is the caller's; a revoked key ends an open watch and frees its slot."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from numprotect.cdr.v1 import cdr_pb2, cdr_pb2_grpc
from numprotect.core.cdr_keys import Bucket
from numprotect.core.identity import api_keys
from numprotect.core.identity.principal import Role
from support import identity as test_identity

X = "700100000000001"
OTHER_BLOCK_NUMBER = "700100000010001"  # not in X's block
UNMATCHED = Bucket("")
READS = ("ListCdrs", "WatchCdrs", "GetCdrStats", "GetAbuseSignals")
WRITES = ("IngestCdrs", "StreamCdrs")


async def code_of(call: Any) -> grpc.StatusCode:
    """The status a call ends with (a unary call, or a response stream read to its end)."""
    try:
        if hasattr(call, "read"):
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def _stream_of(*records: cdr_pb2.CallDetailRecord) -> AsyncIterator[cdr_pb2.StreamCdrsRequest]:
    for record in records:
        yield cdr_pb2.StreamCdrsRequest(record=record)


def calls_of(stub: Any, record: cdr_pb2.CallDetailRecord, tenant_id: str) -> dict[str, Callable[[], Any]]:
    """Each of the six RPCs, started when called."""
    return {
        "IngestCdrs": lambda: stub.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=[record])),
        "StreamCdrs": lambda: stub.StreamCdrs(_stream_of(record)),
        "ListCdrs": lambda: stub.ListCdrs(cdr_pb2.ListCdrsRequest(tenant_id=tenant_id)),
        "WatchCdrs": lambda: stub.WatchCdrs(cdr_pb2.WatchCdrsRequest(tenant_id=tenant_id, cursor="0")),
        "GetCdrStats": lambda: stub.GetCdrStats(cdr_pb2.GetCdrStatsRequest(tenant_id=tenant_id)),
        "GetAbuseSignals": lambda: stub.GetAbuseSignals(cdr_pb2.GetAbuseSignalsRequest(tenant_id=tenant_id)),
    }


def cdr_keys(redis_sync: Any) -> list[bytes]:
    return sorted(redis_sync.scan_iter(match="np:cdr:*"))


async def test_no_key_or_a_wrong_one_is_unauthenticated_on_every_rpc_and_stores_nothing(
    cdr_service: Any, make_record: Any, redis_sync: Any
) -> None:
    forged = "npk_0123456789abcdef_" + "A" * 43  # well-formed, never issued
    async with cdr_service() as cdr:
        anonymous = calls_of(cdr.anonymous, make_record("anon"), "t1")
        wrong = calls_of(cdr_pb2_grpc.CdrServiceStub(cdr.svc.channel_with(forged)), make_record("forged"), "t1")
        codes = {name: await code_of(start()) for name, start in anonymous.items()}
        wrong_codes = {name: await code_of(start()) for name, start in wrong.items()}
    assert codes == dict.fromkeys([*WRITES, *READS], grpc.StatusCode.UNAUTHENTICATED)
    assert wrong_codes == codes
    assert cdr_keys(redis_sync) == []


async def test_a_tenant_may_not_report_calls_and_a_carrier_may_not_read_them(
    cdr_service: Any, make_record: Any, redis_sync: Any
) -> None:
    async with cdr_service() as cdr:
        as_tenant = calls_of(cdr.tenant("t1"), make_record("t"), "t1")
        as_carrier = calls_of(cdr.carrier, make_record("c"), "t1")
        tenant_codes = {name: await code_of(as_tenant[name]()) for name in WRITES}
        carrier_codes = {name: await code_of(as_carrier[name]()) for name in READS}
    assert tenant_codes == dict.fromkeys(WRITES, grpc.StatusCode.PERMISSION_DENIED)
    assert carrier_codes == dict.fromkeys(READS, grpc.StatusCode.PERMISSION_DENIED)
    assert cdr_keys(redis_sync) == []


async def _take(call: Any, count: int) -> list[cdr_pb2.WatchCdrsResponse]:
    out: list[cdr_pb2.WatchCdrsResponse] = []
    async for message in call:
        out.append(message)
        if len(out) == count:
            break
    return out


async def test_tenant_b_cannot_read_tenant_a_and_a_is_unchanged(
    cdr_service: Any, make_record: Any, make_binding: Any, redis_sync: Any
) -> None:
    await make_binding("bA", tenant_id="tA")
    records = [make_record(f"a{i}", binding_id="bA") for i in range(3)]
    async with cdr_service() as cdr:
        assert (await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=records))).accepted == 3
        owner = cdr.tenant("tA")
        before = (
            await owner.ListCdrs(cdr_pb2.ListCdrsRequest()),  # empty tenant_id: the key's own tenant
            await owner.GetCdrStats(cdr_pb2.GetCdrStatsRequest()),
            await owner.GetAbuseSignals(cdr_pb2.GetAbuseSignalsRequest(virtual_number=X)),
        )
        assert sorted(r.call_id for r in before[0].records) == ["a0", "a1", "a2"]
        assert before[1].calls == 3 and before[1].tenant_id == "tA"
        snapshot = {key: redis_sync.dump(key) for key in cdr_keys(redis_sync)}

        intruder = cdr.tenant("tB")
        denied = {name: await code_of(start()) for name, start in calls_of(intruder, records[0], "tA").items()}
        # Records no binding matched are the operator's; a tenant asks for them in vain.
        unmatched = {
            "ListCdrs": await code_of(intruder.ListCdrs(cdr_pb2.ListCdrsRequest(unmatched=True))),
            "WatchCdrs": await code_of(intruder.WatchCdrs(cdr_pb2.WatchCdrsRequest(unmatched=True, cursor="0"))),
            "GetAbuseSignals": await code_of(intruder.GetAbuseSignals(cdr_pb2.GetAbuseSignalsRequest(unmatched=True))),
        }
        # Its own stream from "0" replays its own calls only: none.
        own_watch = intruder.WatchCdrs(cdr_pb2.WatchCdrsRequest(cursor="0"))
        own_replay = asyncio.ensure_future(_take(own_watch, 1))
        await asyncio.sleep(0.6)  # three reads of the stream (watch block 200 ms)
        assert not own_replay.done()
        own_watch.cancel()
        # The operator reads any tenant's by naming it.
        operator = await cdr.operator.ListCdrs(cdr_pb2.ListCdrsRequest(tenant_id="tA"))
        after = (
            await owner.ListCdrs(cdr_pb2.ListCdrsRequest()),
            await owner.GetCdrStats(cdr_pb2.GetCdrStatsRequest()),
            await owner.GetAbuseSignals(cdr_pb2.GetAbuseSignalsRequest(virtual_number=X)),
        )
    assert denied == {
        **dict.fromkeys(WRITES, grpc.StatusCode.PERMISSION_DENIED),  # not a carrier
        **dict.fromkeys(READS, grpc.StatusCode.PERMISSION_DENIED),  # not its tenant
    }
    assert unmatched == dict.fromkeys(unmatched, grpc.StatusCode.PERMISSION_DENIED)
    assert sorted(r.call_id for r in operator.records) == ["a0", "a1", "a2"]
    assert after == before
    assert {key: redis_sync.dump(key) for key in cdr_keys(redis_sync)} == snapshot


async def test_a_carrier_reports_only_calls_on_its_own_numbers_and_cannot_preempt_another(
    cdr_service: Any, make_record: Any, make_binding: Any, redis_sync: Any
) -> None:
    # Tenant t1 has a number of each carrier: X (routed by cdr.carrier_id) and OTHER_BLOCK_NUMBER (by "carrier-d").
    await make_binding("b-x", tenant_id="t1")
    await make_binding("b-d", tenant_id="t1", virtual_number=OTHER_BLOCK_NUMBER)
    unbound = {"calling_number": "13700000009", "target_number": "", "carrier_id": ""}  # matches no binding
    async with cdr_service() as cdr:
        cdr.route("carrier-d", OTHER_BLOCK_NUMBER)
        own = cdr.carrier_id
        forged = [
            make_record("d-call-1", binding_id="b-d", called_number=OTHER_BLOCK_NUMBER, carrier_id=""),
            make_record("d-call-2", called_number=OTHER_BLOCK_NUMBER, **unbound),  # would be unmatched
            make_record("d-call-3", called_number="700100000020001", carrier_id=""),  # a block nobody routes
        ]
        reply = await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=forged))
        streamed = await cdr.carrier.StreamCdrs(_stream_of(*forged))
        assert cdr_keys(redis_sync) == []  # nothing written: no record, no counter, no dedup key
        # The same call ids on its own number are its own calls: stored, and they block nothing of D's.
        mine = [make_record("d-call-1", binding_id="b-x", carrier_id=""), make_record("d-call-2", **unbound)]
        assert (await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=mine))).accepted == 2
        real = await cdr.as_carrier("carrier-d").IngestCdrs(cdr_pb2.IngestCdrsRequest(records=forged[:2]))
        listed = await cdr.tenant("t1").ListCdrs(cdr_pb2.ListCdrsRequest(page_size=100))
        unmatched = await cdr.operator.ListCdrs(cdr_pb2.ListCdrsRequest(unmatched=True, page_size=100))
    for summary in (reply, streamed):
        assert (summary.accepted, summary.duplicates) == (0, 0)
        assert [(r.index, r.call_id, r.field) for r in summary.rejected] == [
            (0, "d-call-1", "called_number"),
            (1, "d-call-2", "called_number"),
            (2, "d-call-3", "called_number"),
        ]
        assert all("not in a block the calling carrier routes" in r.reason for r in summary.rejected)
    assert (real.accepted, real.duplicates, len(real.rejected)) == (2, 0, 0)
    assert sorted((r.call_id, r.carrier_id, r.called_number) for r in listed.records) == [
        ("d-call-1", "carrier-d", OTHER_BLOCK_NUMBER),
        ("d-call-1", own, X),
    ]
    assert sorted((r.call_id, r.carrier_id, r.called_number) for r in unmatched.records) == [
        ("d-call-2", "carrier-d", OTHER_BLOCK_NUMBER),
        ("d-call-2", own, X),
    ]


async def test_the_stored_carrier_id_is_the_callers_and_a_different_one_is_rejected(
    cdr_service: Any, make_record: Any
) -> None:
    async with cdr_service() as cdr:
        own = cdr.carrier_id
        records = [
            make_record("empty", carrier_id=""),
            make_record("same", carrier_id=own),
            make_record("other", carrier_id="carrier-d"),
        ]
        reply = await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=records))
        listed = await cdr.operator.ListCdrs(cdr_pb2.ListCdrsRequest(unmatched=True))
    assert reply.accepted == 2
    assert [(r.index, r.call_id, r.field) for r in reply.rejected] == [(2, "other", "carrier_id")]
    assert "taken from the caller's API key" in reply.rejected[0].reason
    assert sorted((r.call_id, r.carrier_id) for r in listed.records) == [("empty", own), ("same", own)]


async def _wait_until_serving(tenant_stub: Any, carrier: Any, record: cdr_pb2.CallDetailRecord) -> Any:
    """Opens a watch of the tenant's own stream and returns it once a record came through it."""
    call = tenant_stub.WatchCdrs(cdr_pb2.WatchCdrsRequest(cursor=""))
    first = asyncio.ensure_future(_take(call, 1))
    deadline = time.monotonic() + 10
    while not first.done():  # the watch starts reading at some point after the call: send until it sees one
        assert time.monotonic() < deadline, "the watch never delivered"
        await carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=[record]))
        await asyncio.wait((first,), timeout=0.3)
        record.call_id += "+"
    assert len(first.result()) == 1
    return call


async def test_a_revoked_key_ends_an_open_idle_watch_within_3_s_and_frees_its_slot(
    cdr_service: Any, make_record: Any, make_binding: Any, redis: Any, redis_sync: Any
) -> None:
    await make_binding("b1", tenant_id="t1")
    # The production reload interval (1 s), one watch per tenant: a slot kept after the revocation would show.
    settings = {"NUMPROTECT_AUTH_REFRESH_SECONDS": "1", "NUMPROTECT_CDR_MAX_WATCHERS_PER_TENANT": "1"}
    async with cdr_service(**settings) as cdr:
        record, token = api_keys.mint_sync(
            redis_sync, test_identity.test_hash_key(), Role.TENANT, "t1", description="revoked in a test", now_ms=_ms()
        )
        directory = cdr.svc.runtime.identity.directory
        assert directory is not None
        directory.reload()
        tenant = cdr_pb2_grpc.CdrServiceStub(cdr.svc.channel_with(token))
        watch = await _wait_until_serving(tenant, cdr.carrier, make_record("w", binding_id="b1"))
        assert cdr.servicer.watch_slots.held("tenant:t1") == 1
        ended = asyncio.ensure_future(code_of(watch))
        await asyncio.sleep(1.5)  # idle: no record for a while
        assert not ended.done()

        revoked_at = time.monotonic()
        await api_keys.store(redis, record.revoked(_ms()))  # as RevokeApiKey does; the service reloads on its own
        code = await asyncio.wait_for(ended, timeout=10)
        delay = time.monotonic() - revoked_at
        print(f"revocation ended the open watch after {delay:.3f} s")
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert delay <= 3.0
        # The slot goes back when the servicer's generator has unwound (its Redis read cancelled): at once, or a
        # moment after the status when a busy machine makes that unwinding slower than the call layer waits.
        slots = cdr.servicer.watch_slots
        while slots.held("tenant:t1"):
            assert time.monotonic() - revoked_at < 5, "the revoked watch kept its slot"
            await asyncio.sleep(0.01)
        print(f"its WatchCdrs slot was free {time.monotonic() - revoked_at:.3f} s after the revocation")
        # The slot is free: another key of the tenant watches at once, and the revoked one is refused.
        again = await _wait_until_serving(cdr.tenant("t1"), cdr.carrier, make_record("w2", binding_id="b1"))
        again.cancel()
        assert await code_of(tenant.ListCdrs(cdr_pb2.ListCdrsRequest())) == grpc.StatusCode.UNAUTHENTICATED


def _ms() -> int:
    return time.time_ns() // 1_000_000
