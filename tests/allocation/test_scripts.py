"""Each Lua script of the allocation service on its own, against real Redis (standalone or cluster)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from numprotect.core import pool_keys
from numprotect.core.identity.directory import CARRIER_BLOCKS_KEY, CARRIER_VERSION_KEY
from numprotect.core.redis_client import LuaScript, RedisClient, create_redis
from numprotect.core.settings import Env, RedisSettings
from numprotect.services.allocation.scripts import Scripts
from support.redis_state import plain as text

BLOCK = "70012345678"
TENANT, CITY = "t1", "010"
POOL = pool_keys.pool_key(TENANT, CITY)
RETENTION_MS = 86_400_000
A, B, C, D = "13800000001", "13800000002", "13800000003", "13800000004"


async def stream(redis: RedisClient, key: str) -> list[dict[str, str]]:
    """The entries' fields of a stream, oldest first, as text."""
    entries: Any = await redis.xrange(key)
    return [text(fields) for _, fields in entries]


@pytest.fixture
async def redis(redis_env: dict[str, str]) -> AsyncIterator[RedisClient]:
    client = create_redis(RedisSettings.from_env(Env(redis_env)))
    yield client
    await client.aclose()


@pytest.fixture
def scripts() -> Scripts:
    return Scripts.load()


async def run(redis: RedisClient, script: LuaScript, *args: str | int) -> Any:
    return await run_in(redis, POOL, script, *args)


async def run_in(redis: RedisClient, subpool: str, script: LuaScript, *args: str | int) -> Any:
    """The script on one sub-pool (base key `subpool`) of the pool of TENANT in CITY."""
    return text(await script(redis, [subpool], [TENANT, CITY, RETENTION_MS, *args]))


async def imported(redis: RedisClient, scripts: Scripts) -> None:
    """BLOCK in a pool of one sub-pool (the pool as it was before sub-pools)."""
    assert await run(redis, scripts.import_block, BLOCK, 0, 1) == [10_000, 1]


async def allocate(
    redis: RedisClient,
    scripts: Scripts,
    mode: str,
    a: str,
    b: str = "",
    *,
    rid: str = "00000000000000aa",
    lease_ms: int = 60_000,
    max_per_number: int = 50,
    target: int = 10,
) -> Any:
    return await run(redis, scripts.allocate, mode, a, b, lease_ms, max_per_number, target, rid, 1234, 8, 16)


async def test_claim_block(redis: RedisClient, scripts: Scripts) -> None:
    claim_keys = [pool_keys.block_owner_key(BLOCK), pool_keys.block_history_key(BLOCK)]
    assert text(await scripts.claim_block(redis, claim_keys, [TENANT, CITY, "ops", "cm"])) == ["new"]
    assert text(await scripts.claim_block(redis, claim_keys, [TENANT, CITY, "ops", "cm"])) == ["mine"]
    assert text(await scripts.claim_block(redis, claim_keys, ["t2", CITY, "ops", "cm"])) == ["other_tenant", TENANT]
    assert text(await scripts.claim_block(redis, claim_keys, [TENANT, "021", "ops", "cm"])) == ["other_city", CITY]
    history = await stream(redis, pool_keys.block_history_key(BLOCK))
    assert len(history) == 1 and history[0]["kind"] == "import"
    assert history[0]["detail"] == f"city={CITY} carrier=cm"


async def test_record_block_carrier(redis: RedisClient, scripts: Scripts) -> None:
    carrier_keys = [CARRIER_BLOCKS_KEY, CARRIER_VERSION_KEY]
    assert text(await scripts.record_block_carrier(redis, carrier_keys, [BLOCK, "cm"])) == "cm"
    assert text(await redis.get(CARRIER_VERSION_KEY)) == "1"
    # The same carrier again: nothing changes, the version stays (no process reloads for nothing).
    assert text(await scripts.record_block_carrier(redis, carrier_keys, [BLOCK, "cm"])) == "cm"
    assert text(await redis.get(CARRIER_VERSION_KEY)) == "1"
    # Another carrier is refused with the holder's id; the table keeps the holder.
    assert text(await scripts.record_block_carrier(redis, carrier_keys, [BLOCK, "cu"])) == "cm"
    assert text(await redis.hgetall(CARRIER_BLOCKS_KEY)) == {BLOCK: "cm"}
    assert text(await scripts.record_block_carrier(redis, carrier_keys, ["70099999999", "cu"])) == "cu"
    assert text(await redis.get(CARRIER_VERSION_KEY)) == "2"


async def test_import_block(redis: RedisClient, scripts: Scripts) -> None:
    await imported(redis, scripts)
    assert await run(redis, scripts.import_block, BLOCK, 0, 1) == [0, 1]
    assert await redis.scard(f"{POOL}:avail") == 10_000
    assert await redis.sismember(f"{POOL}:avail", BLOCK + "9999")
    assert text(await redis.hgetall(POOL)) == {
        "tenant": TENANT,
        "city": CITY,
        "total": "10000",
        "subpool": "0",
        "subpools": "1",
    }


async def test_import_block_into_sub_pools(redis: RedisClient, scripts: Scripts) -> None:
    """Each sub-pool gets the numbers whose last four digits are its index modulo the count; sub-pool 0's import
    fixes the count of a new pool, and a later one asking for another count gets the fixed one."""
    layout = pool_keys.PoolLayout.of(TENANT, CITY, 3)
    assert await run_in(redis, layout.keys[0], scripts.import_block, BLOCK, 0, 3) == [3_334, 3]
    assert await run_in(redis, layout.keys[0], scripts.import_block, "70012345679", 0, 5) == [3_334, 3]
    for index in (1, 2):
        assert await run_in(redis, layout.keys[index], scripts.import_block, BLOCK, index, 3) == [3_333, 3]
        record = text(await redis.hmget(layout.keys[index], ["subpool", "subpools", "total"]))
        assert record == [str(index), "3", "3333"]
    for index, key in enumerate(layout.keys):
        members = {text(m) for m in await redis.smembers(f"{key}:avail")}
        assert all(int(n[-4:]) % 3 == index for n in members)
        assert BLOCK + f"{index:04d}" in members
    assert sum([await redis.scard(f"{key}:avail") for key in layout.keys]) == 10_000 + 3_334


async def test_a_pool_made_before_sub_pools_stays_one(redis: RedisClient, scripts: Scripts) -> None:
    """A pool whose record has no sub-pool count (imported by the previous release) keeps all its numbers in
    sub-pool 0 whatever count a new import asks for, and its record says so from then on."""
    await redis.hset(POOL, mapping={"tenant": TENANT, "city": CITY, "total": 0})
    assert await run(redis, scripts.import_block, BLOCK, 0, 3) == [10_000, 1]
    assert text(await redis.hget(POOL, "subpools")) == "1"


async def test_allocate(redis: RedisClient, scripts: Scripts) -> None:
    await imported(redis, scripts)
    ok, x, ext, expire = await allocate(redis, scripts, "AXB", A, B, rid="00000000000000a1")
    assert (ok, ext) == ("ok", "")
    assert text(await redis.hgetall(f"{POOL}:h:{x}")) == {
        f"p:{A}": "00000000000000a1",
        f"p:{B}": "00000000000000a1",
        "r:00000000000000a1": f"AXB|{A}|{B}||",
    }
    assert await redis.zscore(f"{POOL}:r:{x}", "00000000000000a1") == expire
    assert await redis.zscore(f"{POOL}:axb", x) == 1
    assert await redis.zscore(f"{POOL}:due", x) == expire
    assert not await redis.sismember(f"{POOL}:avail", x)
    # Below the target: the in-use number is reused, unless a party already holds a binding on it.
    assert (await allocate(redis, scripts, "AXB", C, D, rid="00000000000000a2"))[1] == x
    assert (await allocate(redis, scripts, "AXB", A, "13900000000", rid="00000000000000a3"))[1] != x
    # AXN never shares; AXE gets a 4-digit extension on a number of its own mode.
    axn = await allocate(redis, scripts, "AXN", A, rid="00000000000000a4")
    axe = await allocate(redis, scripts, "AXE", A, B, rid="00000000000000a5")
    assert axn[1] != x and axe[1] not in (x, axn[1]) and len(axe[2]) == 4
    history = await stream(redis, f"{POOL}:hist:{x}")
    assert [e["kind"] for e in history] == ["assign", "assign"]
    assert A not in history[0]["detail"] and "138****0001" in history[0]["detail"]  # masked


async def test_allocate_exhausted(redis: RedisClient, scripts: Scripts) -> None:
    # Each call its own reservation id (a repeated id gets the answer kept for it: test_scripts_repeated.py).
    assert await allocate(redis, scripts, "AXN", A, rid="00000000000000b1") == ["exhausted"]
    await redis.sadd(f"{POOL}:blocks", BLOCK)
    await redis.sadd(f"{POOL}:avail", BLOCK + "0001")
    reply = await allocate(redis, scripts, "AXB", A, B, rid="00000000000000b2", max_per_number=1, target=1)
    assert reply[1] == BLOCK + "0001"
    assert await allocate(redis, scripts, "AXB", C, D, rid="00000000000000b3", max_per_number=1, target=1) == [
        "exhausted"
    ]
    # A number wrongly left in the free set while it has a live reservation is never handed out twice.
    await redis.sadd(f"{POOL}:avail", BLOCK + "0001")
    assert await allocate(redis, scripts, "AXN", C, rid="00000000000000b4") == ["exhausted"]
    assert not await redis.sismember(f"{POOL}:avail", BLOCK + "0001")


async def test_confirm(redis: RedisClient, scripts: Scripts) -> None:
    await imported(redis, scripts)
    # The default lease (60 s): a 500 ms one lapsed before the confirm on a loaded host ("missing", not "ok").
    _, x, _, expire = await allocate(redis, scripts, "AXB", A, B, rid="00000000000000c1")
    later = expire + 3_600_000
    assert await run(redis, scripts.confirm, x, "00000000000000ff", "b1", later) == ["missing"]
    assert await run(redis, scripts.confirm, x, "00000000000000c1", "b1", 1_000) == ["past"]
    assert await run(redis, scripts.confirm, x, "00000000000000c1", "b1", later) == ["ok", 1]
    assert await redis.zscore(f"{POOL}:r:{x}", "00000000000000c1") == later
    assert await run(redis, scripts.confirm, x, "00000000000000c1", "b2", later) == ["other_binding", "b1"]
    assert text(await redis.hget(f"{POOL}:h:{x}", "r:00000000000000c1")) == f"AXB|{A}|{B}||b1"


async def test_cancel(redis: RedisClient, scripts: Scripts) -> None:
    await imported(redis, scripts)
    _, x, _, _ = await allocate(redis, scripts, "AXB", A, B, rid="00000000000000d1")
    assert await run(redis, scripts.cancel, x, "00000000000000d1", "binding deleted") == ["ok", 0]
    assert await run(redis, scripts.cancel, x, "00000000000000d1", "again") == ["missing"]
    assert await redis.sismember(f"{POOL}:avail", x)
    assert await redis.zscore(f"{POOL}:axb", x) is None
    assert await redis.hlen(f"{POOL}:h:{x}") == 0
    last = (await stream(redis, f"{POOL}:hist:{x}"))[-1]
    assert (last["kind"], last["reason"]) == ("unassign", "binding deleted")


async def test_replace(redis: RedisClient, scripts: Scripts) -> None:
    await imported(redis, scripts)
    _, x, _, _ = await allocate(redis, scripts, "AXB", A, B, rid="00000000000000e1")
    await allocate(redis, scripts, "AXB", C, D, rid="00000000000000e2")
    assert await run(redis, scripts.replace, x, "00000000000000e1", B, C) == ["conflict"]
    assert await run(redis, scripts.replace, x, "00000000000000e1", B, A) == ["conflict"]
    assert await run(redis, scripts.replace, x, "00000000000000e1", "13999999999", C) == ["not_party"]
    assert await run(redis, scripts.replace, x, "00000000000000e9", B, C) == ["missing"]
    assert await run(redis, scripts.replace, x, "00000000000000e1", B, "13900000005") == ["ok"]
    fields = text(await redis.hgetall(f"{POOL}:h:{x}"))
    assert fields["p:13900000005"] == "00000000000000e1" and f"p:{B}" not in fields
    assert fields["r:00000000000000e1"] == f"AXB|{A}|13900000005||"


async def test_release(redis: RedisClient, scripts: Scripts) -> None:
    await imported(redis, scripts)
    _, x, _, _ = await allocate(redis, scripts, "AXN", A, rid="00000000000000f1")
    assert await run(redis, scripts.release, x, "ops", "why", 60_000) == ["in_use", 1]
    free = BLOCK + ("0001" if x != BLOCK + "0001" else "0002")
    reply = await run(redis, scripts.release, free, "ops", "why", 60_000)
    assert reply[:5] == ["ok", "COOLING", 0, "", ""] and reply[5] > 0
    assert not await redis.sismember(f"{POOL}:avail", free)
    assert await run(redis, scripts.release, "700999999990000", "ops", "why", 1) == ["unknown"]


async def test_lock(redis: RedisClient, scripts: Scripts) -> None:
    await imported(redis, scripts)
    _, x, _, _ = await allocate(redis, scripts, "AXB", A, B)
    assert await run(redis, scripts.lock, x, "abuse", "ops") == ["ok", "LOCKED", 1, "AXB", "abuse", 0]
    assert await redis.zscore(f"{POOL}:axb", x) is None  # never reused while locked
    cooling = BLOCK + "0100"
    await run(redis, scripts.release, cooling, "ops", "", 60_000)
    await run(redis, scripts.lock, cooling, "check", "ops")
    assert await redis.zscore(f"{POOL}:cooling", cooling) is None
    assert await redis.hget(f"{POOL}:lockcool", cooling) is not None
    assert await run(redis, scripts.release, cooling, "ops", "", 1) == ["locked"]


async def test_unlock(redis: RedisClient, scripts: Scripts) -> None:
    await imported(redis, scripts)
    _, x, _, _ = await allocate(redis, scripts, "AXB", A, B)
    await run(redis, scripts.lock, x, "abuse", "ops")
    assert await run(redis, scripts.unlock, x, "ops") == ["ok", "IN_USE", 1, "AXB", "", 0]
    assert await redis.zscore(f"{POOL}:axb", x) == 1
    free = BLOCK + "0200"
    await run(redis, scripts.lock, free, "abuse", "ops")
    assert await run(redis, scripts.unlock, free, "ops") == ["ok", "AVAILABLE", 0, "", "", 0]
    assert await run(redis, scripts.unlock, free, "ops") == ["ok", "AVAILABLE", 0, "", "", 0]  # idempotent
    assert await redis.sismember(f"{POOL}:avail", free)
    assert len(await stream(redis, f"{POOL}:hist:{free}")) == 2  # lock + unlock, no event for the no-op


async def test_number_info_prunes_lapsed_reservations(redis: RedisClient, scripts: Scripts) -> None:
    await imported(redis, scripts)
    _, x, _, _ = await allocate(redis, scripts, "AXB", A, B, lease_ms=100)
    assert (await run(redis, scripts.number_info, x))[:3] == ["ok", "IN_USE", 1]
    await asyncio.sleep(0.2)
    assert await run(redis, scripts.number_info, x) == ["ok", "AVAILABLE", 0, "", "", 0]
    assert await redis.sismember(f"{POOL}:avail", x)
    kinds = [(e["kind"], e.get("reason")) for e in await stream(redis, f"{POOL}:hist:{x}")]
    assert kinds == [("assign", None), ("unassign", "expired")]
    assert await run(redis, scripts.number_info, "700999999990000") == ["unknown"]


async def test_pool_stats_sweeps_before_counting(redis: RedisClient, scripts: Scripts) -> None:
    await imported(redis, scripts)
    lapsing = set()
    for i in range(30):
        _, x, _, _ = await allocate(redis, scripts, "AXN", f"1380000{i:04d}", rid=f"{i:016x}", lease_ms=100)
        lapsing.add(x)
    await allocate(redis, scripts, "AXN", "13900000000", rid="00000000000000ff")
    await run(redis, scripts.lock, BLOCK + "0001", "x", "ops")
    await run(redis, scripts.release, BLOCK + "0002", "ops", "", 60_000)
    await asyncio.sleep(0.2)
    reply = await run(redis, scripts.pool_stats, 1_000)
    total, available, in_use, locked, cooling, settled, net_taken, now_ms = reply
    assert (total, in_use, locked, cooling, settled) == (10_000, 1, 1, 1, 1)
    assert total == available + in_use + locked + cooling
    # 31 numbers taken from the free set, the lapsed ones back in it (a locked one stays out): the rate's net take.
    returned = sum([await redis.sismember(f"{POOL}:avail", x) for x in lapsing])
    assert returned >= 29
    assert net_taken == 31 - returned
    assert abs(now_ms - time.time() * 1000) < 60_000
