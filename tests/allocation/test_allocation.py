"""The allocation service end to end: real gRPC server in-process, real Redis (standalone or cluster)."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from numprotect.allocation.v1 import allocation_pb2 as pb
from numprotect.common.v1 import common_pb2
from numprotect.core import pool_keys
from numprotect.core.settings import SettingsError
from numprotect.services.allocation.app import build
from support.inprocess import running_service
from support.rpc import fails, violated_fields

if TYPE_CHECKING:
    # Tests call each RPC as its allowed principal (conftest.AsPolicy), which stands for this stub.
    from numprotect.allocation.v1.allocation_pb2_grpc import AllocationServiceAsyncStub as Stub

Service = Callable[..., AbstractAsyncContextManager[Any]]
AXB = common_pb2.BINDING_MODE_AXB
AXN = common_pb2.BINDING_MODE_AXN
AXE = common_pb2.BINDING_MODE_AXE
BLOCK = "70012345678"
# Binding ids as the binding service issues them ("b" and 22 hex digits: numprotect.core.identifiers.BINDING_ID).
B1 = "b" + "1" * 22
B9 = "b" + "9" * 22
B42 = "b" + "42" * 11
BLOCK_2 = "70087654321"
# The allocation policy inside one sub-pool (least-loaded first, reuse up to the target) is asserted exactly on a
# pool of one sub-pool, whatever the Redis mode's default; test_subpools.py covers pools of several.
ONE_SUBPOOL = {"NUMPROTECT_ALLOCATION_SUBPOOLS": "1"}


def party(i: int) -> str:
    """A distinct, valid mobile number per i."""
    return f"138{i:08d}"


def duration(seconds: float) -> Duration:
    value = Duration()
    value.FromMilliseconds(round(seconds * 1000))
    return value


def timestamp_in(seconds: float) -> Timestamp:
    value = Timestamp()
    value.FromMilliseconds(round((time.time() + seconds) * 1000))
    return value


async def import_block(
    stub: Stub, block: str = BLOCK, tenant: str = "t1", city: str = "010", carrier: str = "cm"
) -> pb.ImportBlockResponse:
    return await stub.ImportBlock(
        pb.ImportBlockRequest(block=block, tenant_id=tenant, city_code=city, carrier_id=carrier, actor="ops")
    )


async def allocate(
    stub: Stub,
    *parties: str,
    mode: common_pb2.BindingMode.ValueType = AXB,
    tenant: str = "t1",
    city: str = "010",
    strict: bool = False,
    lease_s: float | None = None,
) -> pb.AllocateNumberResponse:
    request = pb.AllocateNumberRequest(
        tenant_id=tenant, mode=mode, parties=list(parties), city_code=city, strict_city=strict
    )
    if lease_s is not None:
        request.lease.CopyFrom(duration(lease_s))
    return await stub.AllocateNumber(request)


async def number(stub: Stub, virtual_number: str) -> pb.NumberInfo:
    reply = await stub.GetNumber(pb.GetNumberRequest(virtual_number=virtual_number))
    return reply.number


async def stats(stub: Stub, tenant: str = "t1", city: str = "") -> pb.GetPoolStatsResponse:
    return await stub.GetPoolStats(pb.GetPoolStatsRequest(tenant_id=tenant, city_code=city))


def subpool_of_number(redis_sync: Any, virtual_number: str, tenant: str = "t1", city: str = "010") -> str:
    """Base key of the sub-pool holding the number, as the pool's record (sub-pool 0's hash) says."""
    subpools = int(redis_sync.hget(pool_keys.pool_key(tenant, city), "subpools") or 1)
    return pool_keys.number_subpool_key(tenant, city, virtual_number, subpools)


async def test_import_is_idempotent_and_a_block_belongs_to_one_tenant(allocation_service: Service) -> None:
    async with allocation_service() as stub:
        first = await import_block(stub)
        assert (first.block, first.numbers_added, first.already_imported) == (BLOCK, 10_000, False)
        again = await import_block(stub)
        assert (again.numbers_added, again.already_imported) == (0, True)

        other = await fails(grpc.StatusCode.FAILED_PRECONDITION, import_block(stub, tenant="t2"))
        assert BLOCK in (other.details() or "")
        assert "t1" not in (other.details() or "")  # the holder is not disclosed
        moved = await fails(grpc.StatusCode.FAILED_PRECONDITION, import_block(stub, city="021"))
        assert "010" in (moved.details() or "")

        bad = await fails(grpc.StatusCode.INVALID_ARGUMENT, import_block(stub, block="70112345678", city="x"))
        assert violated_fields(bad) == ["block", "city_code"]
        no_carrier = await fails(grpc.StatusCode.INVALID_ARGUMENT, import_block(stub, block=BLOCK_2, carrier=""))
        assert violated_fields(no_carrier) == ["carrier_id"] and "is required" in (no_carrier.details() or "")
        bad_carrier = await fails(grpc.StatusCode.INVALID_ARGUMENT, import_block(stub, block=BLOCK_2, carrier="c{m}"))
        assert violated_fields(bad_carrier) == ["carrier_id"] and "letters, digits" in (bad_carrier.details() or "")

        total = await stats(stub)
        assert (total.total, total.available, total.in_use) == (10_000, 10_000, 0)
        assert (await stats(stub, tenant="t2")).total == 0
        info = await number(stub, BLOCK + "0042")
        assert (info.tenant_id, info.city_code, info.state) == ("t1", "010", pb.NUMBER_STATE_AVAILABLE)


async def test_bad_input_is_invalid_argument_naming_the_field(allocation_service: Service) -> None:
    async with allocation_service() as stub:
        await import_block(stub)
        cases: list[tuple[Any, list[str]]] = [
            (allocate(stub, party(1), party(2), tenant=""), ["tenant_id"]),
            (allocate(stub, party(1), party(2), tenant="a{b}"), ["tenant_id"]),
            (allocate(stub, party(1), party(2), mode=common_pb2.BINDING_MODE_UNSPECIFIED), ["mode"]),
            (allocate(stub, party(1), "12345"), ["parties[1]"]),
            (allocate(stub, party(1), "700123456789012"), ["parties[1]"]),
            (allocate(stub, party(1)), ["parties"]),
            (allocate(stub, party(1), party(1)), ["parties[1]"]),
            (allocate(stub, party(1), party(2), party(3), mode=AXN), ["parties"]),
            (allocate(stub, *[party(1)] * 100_000), ["parties"]),
            (allocate(stub, party(1), party(2), city="10"), ["city_code"]),
            (allocate(stub, party(1), party(2), lease_s=100_000), ["lease"]),
            (allocate(stub, party(1), party(2), lease_s=0.05), ["lease"]),
            (
                stub.AllocateNumber(
                    pb.AllocateNumberRequest(
                        tenant_id="t1",
                        mode=AXB,
                        parties=[party(1), party(2)],
                        city_code="010",
                        lease=Duration(seconds=1, nanos=-1),
                    )
                ),
                ["lease"],
            ),
            (
                stub.ConfirmReservation(pb.ConfirmReservationRequest(reservation_id="nope", binding_id="b")),
                ["reservation_id"],
            ),
            (stub.GetNumber(pb.GetNumberRequest(virtual_number="7001234")), ["virtual_number"]),
            (stub.LockNumber(pb.LockNumberRequest(virtual_number=BLOCK + "0001")), ["reason"]),
            (stub.GetPoolStats(pb.GetPoolStatsRequest(tenant_id="t1", city_code="abc")), ["city_code"]),
            (
                stub.ListNumberHistory(pb.ListNumberHistoryRequest(virtual_number=BLOCK + "0001", page_token="x")),
                ["page_token"],
            ),
        ]
        for call, fields in cases:
            error = await fails(grpc.StatusCode.INVALID_ARGUMENT, call)
            assert violated_fields(error) == fields, error.details()
        reply = await allocate(stub, party(1), party(2))
        bad_confirm = pb.ConfirmReservationRequest(reservation_id=reply.reservation_id, binding_id=B1)
        error = await fails(grpc.StatusCode.INVALID_ARGUMENT, stub.ConfirmReservation(bad_confirm))
        assert violated_fields(error) == ["expire_time"]
        bad_confirm.expire_time.CopyFrom(timestamp_in(-5))
        error = await fails(grpc.StatusCode.INVALID_ARGUMENT, stub.ConfirmReservation(bad_confirm))
        assert violated_fields(error) == ["expire_time"]
        # Values no Timestamp may hold (they once answered INTERNAL), then a binding id that is none.
        for stamp in (
            Timestamp(seconds=int(time.time()) + 60, nanos=-1),
            Timestamp(seconds=253_402_300_800),
            Timestamp(seconds=int(time.time()) + 60, nanos=1_000_000_000),
        ):
            bad_confirm.expire_time.CopyFrom(stamp)
            error = await fails(grpc.StatusCode.INVALID_ARGUMENT, stub.ConfirmReservation(bad_confirm))
            assert violated_fields(error) == ["expire_time"]
        bad_confirm.expire_time.CopyFrom(timestamp_in(60))
        for binding_id in ("", "b1", "\uff42" + "\uff11" * 22, B1[:-1] + "\x00", B1.upper(), B1 + "0" * 65536):
            bad_confirm.binding_id = binding_id
            error = await fails(grpc.StatusCode.INVALID_ARGUMENT, stub.ConfirmReservation(bad_confirm))
            assert violated_fields(error) == ["binding_id"]
            assert len(error.details() or "") < 200  # the rule, not the value, is echoed


async def test_parties_are_normalised_and_never_repeat_on_a_number(allocation_service: Service) -> None:
    async with allocation_service() as stub:
        await import_block(stub)
        first = await allocate(stub, "+86 138-0000-0001", party(2))
        # The same real number written differently is the same party: never twice on one number.
        numbers = {first.virtual_number}
        for i in range(5):
            reply = await allocate(stub, "0086" + party(1), party(100 + i))
            assert reply.virtual_number not in numbers
            numbers.add(reply.virtual_number)


async def test_axb_reuses_in_use_numbers_evenly_up_to_the_target(allocation_service: Service, redis_sync: Any) -> None:
    async with allocation_service(NUMPROTECT_ALLOCATION_TARGET_BINDINGS_PER_NUMBER="3", **ONE_SUBPOOL) as stub:
        await import_block(stub)
        replies = [await allocate(stub, party(2 * i), party(2 * i + 1)) for i in range(30)]
        counts: dict[str, int] = {}
        for reply in replies:
            counts[reply.virtual_number] = counts.get(reply.virtual_number, 0) + 1
        # 30 bindings with distinct parties on exactly 10 numbers, 3 each: reuse, evenly.
        assert sorted(counts.values()) == [3] * 10
        for virtual_number, count in counts.items():
            info = await number(stub, virtual_number)
            assert (info.state, info.active_bindings, info.mode) == (pb.NUMBER_STATE_IN_USE, count, AXB)
        pool = await stats(stub)
        assert (pool.total, pool.available, pool.in_use) == (10_000, 9_990, 10)


async def test_max_bindings_per_number_holds(allocation_service: Service) -> None:
    settings = {
        "NUMPROTECT_ALLOCATION_MAX_BINDINGS_PER_NUMBER": "2",
        "NUMPROTECT_ALLOCATION_TARGET_BINDINGS_PER_NUMBER": "2",
        **ONE_SUBPOOL,
    }
    async with allocation_service(**settings) as stub:
        await import_block(stub)
        replies = [await allocate(stub, party(2 * i), party(2 * i + 1)) for i in range(9)]
        for reply in replies:
            assert (await number(stub, reply.virtual_number)).active_bindings <= 2
        assert len({r.virtual_number for r in replies}) == 5


async def test_axn_is_exclusive_and_axe_hands_out_distinct_extensions(allocation_service: Service) -> None:
    async with allocation_service(NUMPROTECT_ALLOCATION_TARGET_BINDINGS_PER_NUMBER="5", **ONE_SUBPOOL) as stub:
        await import_block(stub)
        axn = await allocate(stub, party(1), mode=AXN)
        assert axn.extension == ""
        info = await number(stub, axn.virtual_number)
        assert (info.state, info.mode, info.active_bindings) == (pb.NUMBER_STATE_IN_USE, AXN, 1)
        others = [await allocate(stub, party(2 * i), party(2 * i + 1), mode=m) for i in range(10) for m in (AXB, AXN)]
        assert axn.virtual_number not in {o.virtual_number for o in others}

        axe = [await allocate(stub, party(1), party(2 + i), mode=AXE) for i in range(5)]
        # The same party may appear several times on an AXE number: the extension tells bindings apart.
        assert len({r.virtual_number for r in axe}) == 1
        extensions = [r.extension for r in axe]
        assert len(set(extensions)) == 5
        assert all(len(e) == 4 and e.isdigit() for e in extensions)
        assert axe[0].virtual_number not in {o.virtual_number for o in others}
        assert (await number(stub, axe[0].virtual_number)).mode == AXE


async def test_exhaustion_never_hands_out_locked_or_cooling_numbers(
    allocation_service: Service, redis_sync: Any
) -> None:
    async with allocation_service(NUMPROTECT_ALLOCATION_COOLDOWN="1h") as stub:
        await import_block(stub)
        locked = BLOCK + "0007"
        released = BLOCK + "0008"
        lock = await stub.LockNumber(pb.LockNumberRequest(virtual_number=locked, reason="abuse", actor="ops-1"))
        assert (lock.number.state, lock.number.lock_reason) == (pb.NUMBER_STATE_LOCKED, "abuse")
        # The translation-facing flag: calls to a locked number are rejected.
        assert redis_sync.get(f"np:lock:{{{locked}}}") == b"abuse"
        release = await stub.ReleaseNumber(
            pb.ReleaseNumberRequest(virtual_number=released, actor="ops-1", reason="tenant returned it")
        )
        assert release.number.state == pb.NUMBER_STATE_COOLING

        async def take(worker: int) -> list[str]:
            got: list[str] = []
            for i in range(10_000):
                try:
                    reply = await allocate(stub, party(worker * 100_000 + i), mode=AXN, lease_s=600)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
                    return got
                got.append(reply.virtual_number)
            return got

        taken = [n for chunk in await asyncio.gather(*(take(w) for w in range(32))) for n in chunk]
        assert len(taken) == len(set(taken)) == 9_998
        assert locked not in taken and released not in taken
        for mode, parties in ((AXN, [party(1)]), (AXB, [party(1), party(2)]), (AXE, [party(1), party(2)])):
            exhausted = await fails(
                grpc.StatusCode.RESOURCE_EXHAUSTED, allocate(stub, *parties, mode=mode, strict=True)
            )
            assert "tenant t1" in (exhausted.details() or "") and "city 010" in (exhausted.details() or "")
        pool = await stats(stub, city="010")
        assert (pool.total, pool.available, pool.in_use, pool.locked, pool.cooling) == (10_000, 0, 9_998, 1, 1)

        unlock = await stub.UnlockNumber(pb.UnlockNumberRequest(virtual_number=locked, actor="ops-2"))
        assert unlock.number.state == pb.NUMBER_STATE_AVAILABLE
        assert redis_sync.get(f"np:lock:{{{locked}}}") is None
        assert (await allocate(stub, party(4), mode=AXN)).virtual_number == locked
        await fails(grpc.StatusCode.RESOURCE_EXHAUSTED, allocate(stub, party(5), mode=AXN))


async def test_released_number_cools_down_then_serves_again(allocation_service: Service) -> None:
    async with allocation_service(NUMPROTECT_ALLOCATION_COOLDOWN="600ms") as stub:
        await import_block(stub)
        x = BLOCK + "0008"
        release = await stub.ReleaseNumber(pb.ReleaseNumberRequest(virtual_number=x, actor="ops", reason="returned"))
        until = release.number.cooling_until.ToMilliseconds()
        assert release.number.state == pb.NUMBER_STATE_COOLING
        assert 0 < until - time.time() * 1000 <= 700
        again = await stub.ReleaseNumber(pb.ReleaseNumberRequest(virtual_number=x, actor="ops", reason="twice"))
        assert again.number.cooling_until.ToMilliseconds() == until  # idempotent: the cool-down is not pushed back
        pool = await stats(stub)
        assert (pool.available, pool.cooling) == (9_999, 1)
        # Locking a cooling number keeps its cool-down for after the unlock.
        await stub.LockNumber(pb.LockNumberRequest(virtual_number=x, reason="check"))
        assert (await stats(stub)).locked == 1
        unlocked = await stub.UnlockNumber(pb.UnlockNumberRequest(virtual_number=x))
        assert unlocked.number.state == pb.NUMBER_STATE_COOLING
        await asyncio.sleep(max(0.0, until / 1000 - time.time()) + 0.1)
        assert (await number(stub, x)).state == pb.NUMBER_STATE_AVAILABLE
        pool = await stats(stub)
        assert (pool.available, pool.cooling, pool.locked) == (10_000, 0, 0)


async def test_locked_in_use_number_keeps_its_bindings_but_gets_no_new_ones(
    allocation_service: Service, redis_sync: Any
) -> None:
    async with allocation_service() as stub:
        await import_block(stub)
        first = await allocate(stub, party(1), party(2))
        await stub.LockNumber(pb.LockNumberRequest(virtual_number=first.virtual_number, reason="complaint"))
        info = await number(stub, first.virtual_number)
        assert (info.state, info.active_bindings, info.lock_reason) == (pb.NUMBER_STATE_LOCKED, 1, "complaint")
        for i in range(20):
            assert (await allocate(stub, party(10 + 2 * i), party(11 + 2 * i))).virtual_number != first.virtual_number
        await fails(
            grpc.StatusCode.FAILED_PRECONDITION,
            stub.ReleaseNumber(pb.ReleaseNumberRequest(virtual_number=first.virtual_number)),
        )
        await stub.UnlockNumber(pb.UnlockNumberRequest(virtual_number=first.virtual_number))
        info = await number(stub, first.virtual_number)
        assert (info.state, info.active_bindings) == (pb.NUMBER_STATE_IN_USE, 1)
        # In use: releasing it would orphan its binding.
        await fails(
            grpc.StatusCode.FAILED_PRECONDITION,
            stub.ReleaseNumber(pb.ReleaseNumberRequest(virtual_number=first.virtual_number)),
        )
        unknown = BLOCK_2 + "0001"
        await fails(
            grpc.StatusCode.NOT_FOUND, stub.LockNumber(pb.LockNumberRequest(virtual_number=unknown, reason="x"))
        )
        assert redis_sync.get(f"np:lock:{{{unknown}}}") is None


async def test_strict_city_versus_fallback(allocation_service: Service) -> None:
    async with allocation_service() as stub:
        await import_block(stub, city="010")
        strict = await fails(
            grpc.StatusCode.RESOURCE_EXHAUSTED, allocate(stub, party(1), party(2), city="021", strict=True)
        )
        assert "t1" in (strict.details() or "") and "021" in (strict.details() or "")
        fallback = await allocate(stub, party(1), party(2), city="021")
        assert (fallback.city_code, fallback.city_fallback) == ("010", True)
        await import_block(stub, block=BLOCK_2, city="021")
        local = await allocate(stub, party(3), party(4), city="021", strict=True)
        assert (local.city_code, local.city_fallback) == ("021", False)
        assert local.virtual_number.startswith(BLOCK_2)
        # Another tenant's pool never serves: t2 has none.
        other = await fails(grpc.StatusCode.RESOURCE_EXHAUSTED, allocate(stub, party(5), party(6), tenant="t2"))
        assert "t2" in (other.details() or "")
        per_city = await stats(stub, city="021")
        both = await stats(stub)
        assert (per_city.total, per_city.in_use, both.total, both.in_use) == (10_000, 1, 20_000, 2)


async def test_unconfirmed_lease_lapses_by_itself(allocation_service: Service, redis_sync: Any) -> None:
    async with allocation_service() as stub:
        await import_block(stub)
        # A 1 s lease: still live when read back even after a loaded host's stall; lapsed after a 1.2 s sleep.
        reply = await allocate(stub, party(1), party(2), lease_s=1.0)
        assert abs(reply.lease_expire_time.ToMilliseconds() - (time.time() * 1000 + 1_000)) < 1_000
        assert (await number(stub, reply.virtual_number)).active_bindings == 1
        await asyncio.sleep(1.2)
        info = await number(stub, reply.virtual_number)
        assert (info.state, info.active_bindings) == (pb.NUMBER_STATE_AVAILABLE, 0)
        pool = await stats(stub)
        assert (pool.available, pool.in_use) == (10_000, 0)
        confirm = pb.ConfirmReservationRequest(
            reservation_id=reply.reservation_id, binding_id=B1, expire_time=timestamp_in(60)
        )
        await fails(grpc.StatusCode.NOT_FOUND, stub.ConfirmReservation(confirm))
        # Nothing of the reservation is left in Redis (in the sub-pool holding the number, which its history shows).
        subpool = subpool_of_number(redis_sync, reply.virtual_number)
        assert redis_sync.xlen(pool_keys.history_key_in(subpool, reply.virtual_number)) == 2  # assign, unassign
        assert redis_sync.zcard(pool_keys.reservations_key_in(subpool, reply.virtual_number)) == 0
        assert redis_sync.hlen(pool_keys.hash_key_in(subpool, reply.virtual_number)) == 0


async def test_lapses_are_swept_without_anyone_asking_about_the_number(allocation_service: Service) -> None:
    async with allocation_service(NUMPROTECT_ALLOCATION_TARGET_BINDINGS_PER_NUMBER="1") as stub:
        await import_block(stub)
        for i in range(20):
            await allocate(stub, party(2 * i), party(2 * i + 1), lease_s=0.2)
        await asyncio.sleep(0.3)
        # Further allocations tidy up lapsed numbers on the way (bounded batch per call).
        await allocate(stub, party(100), party(101))
        await allocate(stub, party(102), party(103))
        pool = await stats(stub)
        assert (pool.in_use, pool.available) == (2, 9_998)


async def test_confirm_extends_cancel_frees_and_replace_swaps_a_party(
    allocation_service: Service, redis_sync: Any
) -> None:
    async with allocation_service(NUMPROTECT_ALLOCATION_TARGET_BINDINGS_PER_NUMBER="5", **ONE_SUBPOOL) as stub:
        await import_block(stub)
        # Leases and ends of 1 s, not 0.3: confirmed and read back in time even after a loaded host's stall.
        first = await allocate(stub, party(1), party(2), lease_s=1.0)
        second = await allocate(stub, party(3), party(4))
        assert second.virtual_number == first.virtual_number  # reuse below the target
        x = first.virtual_number
        await stub.ConfirmReservation(
            pb.ConfirmReservationRequest(
                reservation_id=first.reservation_id, binding_id=B1, expire_time=timestamp_in(30)
            )
        )
        await asyncio.sleep(1.2)
        assert (await number(stub, x)).active_bindings == 2  # confirmed past its lease
        # A confirmed reservation belongs to its binding.
        await fails(
            grpc.StatusCode.FAILED_PRECONDITION,
            stub.ConfirmReservation(
                pb.ConfirmReservationRequest(
                    reservation_id=first.reservation_id, binding_id=B9, expire_time=timestamp_in(30)
                )
            ),
        )

        conflict = await fails(
            grpc.StatusCode.FAILED_PRECONDITION,
            stub.ReplaceParty(
                pb.ReplacePartyRequest(reservation_id=first.reservation_id, old_party=party(2), new_party=party(3))
            ),
        )
        assert "138****0003" in (conflict.details() or "") and x in (conflict.details() or "")
        await fails(
            grpc.StatusCode.FAILED_PRECONDITION,
            stub.ReplaceParty(
                pb.ReplacePartyRequest(reservation_id=first.reservation_id, old_party=party(7), new_party=party(8))
            ),
        )
        replaced = await stub.ReplaceParty(
            pb.ReplacePartyRequest(reservation_id=first.reservation_id, old_party=party(2), new_party=party(5))
        )
        fields = redis_sync.hgetall(pool_keys.hash_key_in(subpool_of_number(redis_sync, x), x))
        assert f"p:{party(5)}".encode() in fields and f"p:{party(2)}".encode() not in fields
        # party(2) is free on x again: an allocation may put it there.
        again = await allocate(stub, party(2), party(6))
        assert again.virtual_number == x

        # Shorten: the binding now ends in 1 s and the reservation lapses with it.
        await stub.ConfirmReservation(
            pb.ConfirmReservationRequest(
                reservation_id=replaced.reservation_id, binding_id=B1, expire_time=timestamp_in(1.0)
            )
        )
        await asyncio.sleep(1.2)
        assert (await number(stub, x)).active_bindings == 2

        cancel = pb.CancelReservationRequest(reservation_id=second.reservation_id, reason="binding deleted")
        await stub.CancelReservation(cancel)
        await stub.CancelReservation(cancel)  # idempotent
        assert (await number(stub, x)).active_bindings == 1
        await stub.CancelReservation(pb.CancelReservationRequest(reservation_id=again.reservation_id))
        info = await number(stub, x)
        assert (info.state, info.active_bindings) == (pb.NUMBER_STATE_AVAILABLE, 0)
        await fails(
            grpc.StatusCode.NOT_FOUND,
            stub.ReplaceParty(
                pb.ReplacePartyRequest(reservation_id=again.reservation_id, old_party=party(2), new_party=party(9))
            ),
        )


async def test_history_records_who_when_why_and_pages(allocation_service: Service) -> None:
    async with allocation_service(NUMPROTECT_ALLOCATION_COOLDOWN="0") as stub:
        started = time.time() * 1000 - 1000
        await import_block(stub)
        reply = await allocate(stub, party(1), party(2), mode=AXN)
        x = reply.virtual_number
        await stub.ConfirmReservation(
            pb.ConfirmReservationRequest(
                reservation_id=reply.reservation_id, binding_id=B42, expire_time=timestamp_in(60)
            )
        )
        await stub.LockNumber(pb.LockNumberRequest(virtual_number=x, reason="complaint 17", actor="ops-1"))
        await stub.UnlockNumber(pb.UnlockNumberRequest(virtual_number=x, actor="ops-2"))
        await stub.CancelReservation(
            pb.CancelReservationRequest(reservation_id=reply.reservation_id, reason="binding deleted")
        )
        await stub.ReleaseNumber(pb.ReleaseNumberRequest(virtual_number=x, actor="ops-3", reason="returned"))

        events: list[pb.NumberEvent] = []
        token = ""
        pages = 0
        while True:
            page = await stub.ListNumberHistory(
                pb.ListNumberHistoryRequest(virtual_number=x, page_size=2, page_token=token)
            )
            events.extend(page.events)
            pages += 1
            token = page.next_page_token
            if not token:
                break
        assert pages == 4
        assert [e.kind for e in events] == ["import", "assign", "confirm", "lock", "unlock", "unassign", "release"]
        by_kind = {e.kind: e for e in events}
        assert by_kind["import"].actor == "ops"
        assert by_kind["confirm"].binding_id == B42
        assert (by_kind["lock"].actor, by_kind["lock"].reason) == ("ops-1", "complaint 17")
        assert by_kind["unlock"].actor == "ops-2"
        assert (by_kind["unassign"].reason, by_kind["unassign"].binding_id) == ("binding deleted", B42)
        assert (by_kind["release"].actor, by_kind["release"].reason) == ("ops-3", "returned")
        assert all(e.tenant_id == "t1" for e in events)
        times = [e.time.ToMilliseconds() for e in events]
        assert times == sorted(times) and times[0] >= started
        # Parties appear masked only.
        assert "138****0001" in by_kind["assign"].detail and party(1) not in by_kind["assign"].detail
        assert not any(party(1) in e.detail or party(2) in e.detail for e in events)


async def test_settings_are_validated_at_build(redis_env: dict[str, str]) -> None:
    bad = {
        **redis_env,
        "NUMPROTECT_ALLOCATION_MAX_BINDINGS_PER_NUMBER": "4",
        "NUMPROTECT_ALLOCATION_TARGET_BINDINGS_PER_NUMBER": "5",
    }
    with pytest.raises(SettingsError, match="NUMPROTECT_ALLOCATION_TARGET_BINDINGS_PER_NUMBER"):
        async with running_service("allocation", build, bad):
            pass
    with pytest.raises(SettingsError, match="NUMPROTECT_ALLOCATION_LEASE"):
        async with running_service("allocation", build, {**redis_env, "NUMPROTECT_ALLOCATION_LEASE": "soon"}):
            pass


async def test_history_tokens_are_signed_bound_to_the_number_and_shared_by_replicas_with_one_key(
    allocation_service: Service,
) -> None:
    key = {"NUMPROTECT_PAGE_TOKEN_KEY": base64.b64encode(b"allocation-test-key-of-32-bytes!").decode()}
    async with allocation_service(**key) as stub, allocation_service(**key) as replica:
        await import_block(stub)
        x = (await allocate(stub, party(1), party(2))).virtual_number
        y = BLOCK + ("0001" if x != BLOCK + "0001" else "0002")
        first = await stub.ListNumberHistory(pb.ListNumberHistoryRequest(virtual_number=x, page_size=1))
        assert [e.kind for e in first.events] == ["import"] and first.next_page_token
        rest = await replica.ListNumberHistory(
            pb.ListNumberHistoryRequest(virtual_number=x, page_token=first.next_page_token)
        )
        assert [e.kind for e in rest.events] == ["assign"] and not rest.next_page_token
        other_number = pb.ListNumberHistoryRequest(virtual_number=y, page_token=first.next_page_token)
        error = await fails(grpc.StatusCode.INVALID_ARGUMENT, stub.ListNumberHistory(other_number))
        assert violated_fields(error) == ["page_token"]
        assert "allocation.ListNumberHistory" in (error.details() or "")
    async with allocation_service(NUMPROTECT_PAGE_TOKEN_KEY=base64.b64encode(b"o" * 32).decode()) as other_key:
        foreign = pb.ListNumberHistoryRequest(virtual_number=x, page_token=first.next_page_token)
        error = await fails(grpc.StatusCode.INVALID_ARGUMENT, other_key.ListNumberHistory(foreign))
        assert violated_fields(error) == ["page_token"]


async def test_out_of_range_times_are_invalid_argument_not_internal(allocation_service: Service) -> None:
    async with allocation_service() as stub:
        await import_block(stub)
        reply = await allocate(stub, party(1), party(2))
        confirm = pb.ConfirmReservationRequest(reservation_id=reply.reservation_id, binding_id=B1)
        confirm.expire_time.seconds = 10**12  # past 9999-12-31
        error = await fails(grpc.StatusCode.INVALID_ARGUMENT, stub.ConfirmReservation(confirm))
        assert violated_fields(error) == ["expire_time"]
        request = pb.AllocateNumberRequest(tenant_id="t1", mode=AXB, parties=[party(3), party(4)], city_code="010")
        request.lease.seconds, request.lease.nanos = 5, -1  # signs differ: not a Duration
        error = await fails(grpc.StatusCode.INVALID_ARGUMENT, stub.AllocateNumber(request))
        assert violated_fields(error) == ["lease"]


async def test_a_bad_page_token_key_stops_start_up(redis_env: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match="NUMPROTECT_PAGE_TOKEN_KEY"):
        async with running_service("allocation", build, {**redis_env, "NUMPROTECT_PAGE_TOKEN_KEY": "c2hvcnQ="}):
            pass
