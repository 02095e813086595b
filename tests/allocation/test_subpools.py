"""Pools of several sub-pools (docs/allocation.md, "Sub-pools"), end to end on real Redis (standalone or cluster):
where the numbers land, every RPC finding a number's sub-pool, falling over from a sub-pool with nothing that fits,
and pools and handles made before sub-pools."""

from __future__ import annotations

import asyncio
import base64
import collections
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc
import pytest
from allocation.conftest import as_policy
from allocation.test_allocation import B1, BLOCK, BLOCK_2, allocate, import_block, number, party, stats, timestamp_in
from redis.crc import key_slot

from numprotect.allocation.v1 import allocation_pb2 as pb
from numprotect.common.v1 import common_pb2
from numprotect.core.doctor import Options, scan_async
from numprotect.core.errors import InvalidArgument
from numprotect.core.pool_keys import Handle, PoolLayout, pool_key, subpool_of, subpool_share
from numprotect.core.redis_client import RedisClient
from numprotect.core.settings import Env, RedisSettings
from numprotect.services.allocation.scripts import Scripts
from support.redis_cluster import RedisClusterServers
from support.rpc import fails

Service = Callable[..., AbstractAsyncContextManager[Any]]
AXN = common_pb2.BINDING_MODE_AXN
THREE = {"NUMPROTECT_ALLOCATION_SUBPOOLS": "3"}
BLOCK_3 = "70011112222"


async def take_all(redis: RedisClient, subpool: str, mode: str, parties: Callable[[int], tuple[str, str]]) -> int:
    """Allocations in one sub-pool through allocate.lua (as AllocateNumber makes them) until it answers exhausted;
    how many it made. Concurrent, 64 at a time."""
    scripts = Scripts.load()
    made = 0
    while True:

        async def one(i: int) -> bool:
            a, b = parties(i)
            rid = f"{i:016x}"
            args: list[str | int] = ["t1", "010", 86_400_000, mode, a, b, 600_000, 50, 10, rid, i % 10_000, 8, 16]
            reply = await scripts.allocate(redis, [subpool], args)
            return bool((reply[0].decode() if isinstance(reply[0], bytes) else reply[0]) == "ok")

        done = await asyncio.gather(*(one(made + i) for i in range(64)))
        made += sum(done)
        if not all(done):
            return made


def test_handles_name_their_subpool_count_and_old_ones_still_read() -> None:
    """rv1 (a pool of one sub-pool, as before sub-pools) and rv2 (with the count) both decode; a count outside
    2..16 in an rv2 handle is no handle AllocateNumber issued."""
    x, rid = BLOCK + "0042", "0123456789abcdef"
    assert Handle("t1", "010", x, rid).encode() == "rv1." + base64.urlsafe_b64encode(
        f"t1:010:{x}:{rid}".encode()
    ).decode().rstrip("=")
    three = Handle("t1", "010", x, rid, 3)
    assert three.encode().startswith("rv2.") and Handle.decode("reservation_id", three.encode()) == three
    for count in ("1", "17", "x", ""):
        raw = base64.urlsafe_b64encode(f"t1:010:{x}:{rid}:{count}".encode()).decode()
        with pytest.raises(InvalidArgument) as caught:
            Handle.decode("reservation_id", "rv2." + raw)
        assert caught.value.violations[0].field == "reservation_id"


async def test_numbers_land_in_every_subpool_on_spread_slots_and_every_rpc_finds_them(
    allocation_service: Service, redis_sync: Any, redis_cluster_servers: RedisClusterServers | None
) -> None:
    async with allocation_service(**THREE) as stub:
        assert (await import_block(stub)).numbers_added == 10_000
        layout = PoolLayout.of("t1", "010", 3)
        assert redis_sync.hget(pool_key("t1", "010"), "subpools") == b"3"
        assert [redis_sync.scard(f"{key}:avail") for key in layout.keys] == [3_334, 3_333, 3_333]
        for index, key in enumerate(layout.keys):
            assert all(subpool_of(n.decode(), 3) == index for n in redis_sync.srandmember(f"{key}:avail", 50))
        # One sub-pool in each third of the slot space; on the test cluster of 3 primaries, one on each primary.
        assert {key_slot(key.encode()) * 3 // 16_384 for key in layout.keys} == {0, 1, 2}
        if redis_cluster_servers is not None:
            assert len({redis_cluster_servers.master_of(key).port for key in layout.keys}) == 3

        # One process, one pool: the start rotates, so each sub-pool serves every third allocation.
        replies = [await allocate(stub, party(2 * i), party(2 * i + 1)) for i in range(30)]
        per_subpool = collections.Counter(subpool_of(r.virtual_number, 3) for r in replies)
        assert per_subpool == {0: 10, 1: 10, 2: 10}
        # Least-loaded first inside each sub-pool: ten bindings with distinct parties reuse one number up to the
        # target (10), as one pool did.
        assert len({r.virtual_number for r in replies}) == 3
        handles = [Handle.decode("reservation_id", r.reservation_id) for r in replies]
        assert all(r.reservation_id.startswith("rv2.") for r in replies)
        assert {h.subpools for h in handles} == {3}
        pool = await stats(stub)
        assert (pool.total, pool.available, pool.in_use) == (10_000, 9_997, 3)

        # Confirm, replace and cancel find each reservation's sub-pool from its handle.
        for index in range(3):
            reply = next(r for r in replies if subpool_of(r.virtual_number, 3) == index)
            await stub.ConfirmReservation(
                pb.ConfirmReservationRequest(
                    reservation_id=reply.reservation_id, binding_id=B1, expire_time=timestamp_in(60)
                )
            )
            replaced = await stub.ReplaceParty(
                pb.ReplacePartyRequest(
                    reservation_id=reply.reservation_id, old_party=party(2 * replies.index(reply)), new_party=party(99)
                )
            )
            assert replaced.reservation_id == reply.reservation_id
            history = await stub.ListNumberHistory(pb.ListNumberHistoryRequest(virtual_number=reply.virtual_number))
            assert [e.kind for e in history.events][-3:] == ["assign", "confirm", "replace"]
            await stub.CancelReservation(pb.CancelReservationRequest(reservation_id=reply.reservation_id))
            assert (await number(stub, reply.virtual_number)).active_bindings == 9

        # Lock, release, unlock and GetNumber find a number's sub-pool from the pool's record.
        free = [n for n in (BLOCK + f"{i:04d}" for i in range(100)) if n not in {r.virtual_number for r in replies}]
        locked = next(n for n in free if subpool_of(n, 3) == 1)
        released = next(n for n in free if subpool_of(n, 3) == 2)
        await stub.LockNumber(pb.LockNumberRequest(virtual_number=locked, reason="abuse"))
        await stub.ReleaseNumber(pb.ReleaseNumberRequest(virtual_number=released, reason="returned"))
        assert (await number(stub, locked)).state == pb.NUMBER_STATE_LOCKED
        assert (await number(stub, released)).state == pb.NUMBER_STATE_COOLING
        pool = await stats(stub)
        assert (pool.available, pool.in_use, pool.locked, pool.cooling) == (9_995, 3, 1, 1)
        await stub.UnlockNumber(pb.UnlockNumberRequest(virtual_number=locked))
        assert (await number(stub, locked)).state == pb.NUMBER_STATE_AVAILABLE
        assert redis_sync.hexists(f"{layout.keys[1]}:locked", locked) == 0
        assert redis_sync.zscore(f"{layout.keys[2]}:cooling", released) is not None


async def test_a_subpool_with_nothing_that_fits_falls_over_and_only_all_exhausted_is_resource_exhausted(
    allocation_svc: Callable[..., AbstractAsyncContextManager[Any]], redis_sync: Any
) -> None:
    async with allocation_svc(**THREE) as svc:
        stub: Any = as_policy(svc)  # stands for the stub (conftest.AsPolicy)
        redis = svc.runtime.redis
        await import_block(stub)
        layout = PoolLayout.of("t1", "010", 3)
        # Sub-pool 1: every number taken by an exclusive AXN reservation.
        assert await take_all(redis, layout.keys[1], "AXN", lambda i: (party(i), "")) == subpool_share(1, 3)
        replies = [await allocate(stub, party(1_000 + i), mode=AXN) for i in range(12)]
        assert {subpool_of(r.virtual_number, 3) for r in replies} == {0, 2}
        # Sub-pool 2: party A already sits on every number (AXB: A may not be bound twice on one number).
        rider = party(500_000)
        taken = await take_all(redis, layout.keys[2], "AXB", lambda i: (rider, party(600_000 + i)))
        assert taken == subpool_share(2, 3) - sum(1 for r in replies if subpool_of(r.virtual_number, 3) == 2)
        # A's next bindings all come from sub-pool 0, whichever sub-pool the rotation starts at.
        again = [await allocate(stub, rider, party(700_000 + i)) for i in range(6)]
        assert {subpool_of(r.virtual_number, 3) for r in again} == {0}
        # Sub-pool 0 full too (exclusive AXN on every free number): A fits nowhere, AXN nowhere.
        await take_all(redis, layout.keys[0], "AXN", lambda i: (party(800_000 + i), ""))
        exhausted = await fails(grpc.StatusCode.RESOURCE_EXHAUSTED, allocate(stub, rider, party(3), strict=True))
        assert "no AXB number left for tenant t1 in city 010" in (exhausted.details() or "")
        await fails(grpc.StatusCode.RESOURCE_EXHAUSTED, allocate(stub, party(4), mode=AXN, strict=True))
        # Other parties still fit on the in-use numbers of sub-pools 0 and 2 (AXB reuse below the cap).
        other = await allocate(stub, party(5), party(6), strict=True)
        assert subpool_of(other.virtual_number, 3) in (0, 2)
        assert (await stats(stub)).available == 0


async def test_a_pool_made_before_subpools_and_its_old_handles_keep_working(
    allocation_service: Service, redis_sync: Any, redis_env: dict[str, str]
) -> None:
    async with allocation_service(NUMPROTECT_ALLOCATION_SUBPOOLS="1") as stub:
        await import_block(stub)
        old = await allocate(stub, party(1), party(2))
    # As the previous release left it: a pool record without sub-pool fields, an rv1 handle of tenant:city:number:rid.
    redis_sync.hdel(pool_key("t1", "010"), "subpool", "subpools")
    version, _, body = old.reservation_id.partition(".")
    tenant, city, x, rid = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode().split(":")
    assert (version, tenant, city, x) == ("rv1", "t1", "010", old.virtual_number) and len(rid) == 16

    async with allocation_service(**THREE) as stub:
        # A new block joins the old pool's one slot whole: the pool keeps the count it was made with.
        assert (await import_block(stub, block=BLOCK_2)).numbers_added == 10_000
        assert redis_sync.hget(pool_key("t1", "010"), "subpools") == b"1"
        assert redis_sync.scard(f"{pool_key('t1', '010')}:avail") == 19_999
        await stub.ConfirmReservation(
            pb.ConfirmReservationRequest(reservation_id=old.reservation_id, binding_id=B1, expire_time=timestamp_in(60))
        )
        await stub.ReplaceParty(
            pb.ReplacePartyRequest(reservation_id=old.reservation_id, old_party=party(2), new_party=party(3))
        )
        newer = await allocate(stub, party(4), party(5))
        assert newer.reservation_id.startswith("rv1.") and newer.virtual_number == old.virtual_number
        assert (await number(stub, BLOCK_2 + "0001")).state == pb.NUMBER_STATE_AVAILABLE
        await stub.CancelReservation(pb.CancelReservationRequest(reservation_id=old.reservation_id))
        assert (await number(stub, old.virtual_number)).active_bindings == 1
        # A new pool of the same tenant gets the setting's count.
        await import_block(stub, block=BLOCK_3, city="021")
        assert redis_sync.hget(pool_key("t1", "021"), "subpools") == b"3"
        assert (await allocate(stub, party(6), party(7), city="021", strict=True)).reservation_id.startswith("rv2.")
        assert (await stats(stub)).total == 30_000
    # The invariant checker reads both kinds of pool.
    report = await scan_async(RedisSettings.from_env(Env(redis_env)), Options(recheck_seconds=0))
    assert report.counts["pool_counters"] == report.counts["number_in_two_pools"] == 0, report.to_text()
    assert report.scanned["pools"] == 2 and report.scanned["sub-pools"] == 4
