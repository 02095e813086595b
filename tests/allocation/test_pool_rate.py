"""GetPoolStats' allocation rate: allocate.lua and pool_lib.lua's per-day net take counters, pool_stats.lua's sum over
the rate window (docs/allocation.md, "Pool stats"). Real service in-process, real Redis."""

from __future__ import annotations

import asyncio
from typing import Any

from allocation.test_allocation import AXB, AXN, BLOCK, ONE_SUBPOOL, Service, allocate, import_block, party, stats

from numprotect.allocation.v1 import allocation_pb2 as pb
from numprotect.core import pool_keys


async def test_net_take_counts_numbers_leaving_and_returning_to_the_free_set(
    allocation_service: Service, redis_sync: Any
) -> None:
    async with allocation_service(**ONE_SUBPOOL) as stub:
        await import_block(stub)
        taken = [await allocate(stub, party(i), mode=AXN) for i in range(5)]  # 5 fresh numbers: +5
        for reservation in taken[:2]:  # back to the free set: -2
            await stub.CancelReservation(pb.CancelReservationRequest(reservation_id=reservation.reservation_id))
        first = await allocate(stub, party(10), party(11), mode=AXB)  # a fresh number: +1
        await allocate(stub, party(12), party(13), mode=AXB)  # reuses the AXB number below its target: no change
        lapsing = await allocate(stub, party(20), mode=AXN, lease_s=0.2)  # +1, then -1 when it lapses
        free = (await stats(stub)).available
        await stub.LockNumber(pb.LockNumberRequest(virtual_number=f"{BLOCK}9999", reason="abuse", actor="ops"))
        await asyncio.sleep(0.3)

        reply = await stats(stub)
        assert reply.net_taken == 5 - 2 + 1
        window_ms = reply.rate_window.ToMilliseconds()
        assert 6 * pool_keys.DAY_MS <= window_ms <= 7 * pool_keys.DAY_MS
        assert reply.net_taken_per_day == reply.net_taken * pool_keys.DAY_MS / window_ms
        # The lapsed reservation went back (+1 available) and the lock took one out: neither is in the rate.
        assert reply.available == free + 1 - 1
        assert [(c.city_code, c.net_taken, c.available) for c in reply.cities] == [("010", 4, reply.available)]
        assert first.virtual_number != lapsing.virtual_number

        # Today's counter sits in the sub-pool's slot and expires (8 days).
        subpool = pool_keys.pool_key("t1", "010")
        today = int(redis_sync.time()[0]) * 1000 // pool_keys.DAY_MS
        assert int(redis_sync.get(pool_keys.taken_key_in(subpool, today))) == 4
        assert 0 < redis_sync.ttl(pool_keys.taken_key_in(subpool, today)) <= 8 * 86_400


async def test_the_window_is_today_and_the_six_days_before(allocation_service: Service, redis_sync: Any) -> None:
    async with allocation_service(**ONE_SUBPOOL) as stub:
        await import_block(stub)
        await import_block(stub, block="70012340000", city="0755")
        subpool = pool_keys.pool_key("t1", "010")
        today = int(redis_sync.time()[0]) * 1000 // pool_keys.DAY_MS
        redis_sync.set(pool_keys.taken_key_in(subpool, today - 6), 70)  # in the window
        redis_sync.set(pool_keys.taken_key_in(subpool, today - 7), 1000)  # before it
        await allocate(stub, party(1), mode=AXN, city="0755", strict=True)

        reply = await stats(stub)
        assert [(c.city_code, c.net_taken) for c in reply.cities] == [("010", 70), ("0755", 1)]
        assert reply.net_taken == 71
        one_city = await stats(stub, city="010")
        assert [c.city_code for c in one_city.cities] == ["010"]
        assert one_city.net_taken == 70
        window_days = one_city.rate_window.ToMilliseconds() / pool_keys.DAY_MS
        assert abs(one_city.net_taken_per_day - 70 / window_days) < 1e-9
        assert one_city.cities[0].net_taken_per_day == one_city.net_taken_per_day
