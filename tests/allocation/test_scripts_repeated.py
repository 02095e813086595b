"""Each write script of the allocation service run twice with the same arguments, as a cluster client does when it
loses a reply and re-sends (docs/redis-schema.md, "Scripts run twice"): the second run leaves the state the first
left, and its answer is the one the table there promises."""

from __future__ import annotations

from typing import Any

import pytest
from allocation.test_scripts import (
    BLOCK,
    CITY,
    POOL,
    RETENTION_MS,
    TENANT,
    A,
    B,
    C,
    allocate,
    imported,
    redis,
    run,
    scripts,
)

from numprotect.core import event_keys, pool_keys
from numprotect.core.redis_client import LuaScript, RedisClient
from numprotect.services.allocation.scripts import Scripts
from support.event_outbox import outbox
from support.redis_state import plain as text
from support.redis_state import run_twice, state

__all__ = ["redis", "scripts"]  # fixtures of the script tests, used here too

POOL_KEYS = f"np:alloc:{{pool:{TENANT}:{CITY}*"  # every sub-pool's keys


async def twice(redis: RedisClient, redis_sync: Any, script: LuaScript, *args: str | int) -> tuple[Any, Any]:
    """Both answers; asserts the second run changed nothing the first wrote."""
    first = await run(redis, script, *args)
    after_first = state(redis_sync, POOL_KEYS)
    second = await run(redis, script, *args)
    assert state(redis_sync, POOL_KEYS) == after_first
    return first, second


@pytest.mark.parametrize(("mode", "b"), [("AXB", B), ("AXN", ""), ("AXE", B)])
async def test_allocate_repeated_answers_the_same_reservation(
    redis: RedisClient, redis_sync: Any, scripts: Scripts, mode: str, b: str
) -> None:
    """Without its kept answer a repeat reserved a second number (AXB: the first is excluded, its parties hold it)
    or a second extension, and the first stayed reserved for its lease with nobody knowing it."""
    await imported(redis, scripts)
    args = (mode, A, b, 60_000, 50, 10, "00000000000000a1", 1234, 8, 16)
    first, second = await twice(redis, redis_sync, scripts.allocate, *args)
    assert first[0] == "ok" and second == first
    number = first[1]
    assert await redis.zcard(f"{POOL}:r:{number}") == 1
    assert await redis.scard(f"{POOL}:avail") == 9_999
    # The kept answer lasts as long as the reservation's lease, no longer.
    assert abs(await redis.pexpiretime(f"{POOL}:a:00000000000000a1") - first[3]) <= 1


async def test_allocate_with_another_id_still_reserves_anew(redis: RedisClient, scripts: Scripts) -> None:
    await imported(redis, scripts)
    first = await allocate(redis, scripts, "AXN", A, rid="00000000000000b1")
    other = await allocate(redis, scripts, "AXN", A, rid="00000000000000b2")
    assert other[0] == "ok" and other[1] != first[1]


async def test_confirm_repeated(redis: RedisClient, redis_sync: Any, scripts: Scripts) -> None:
    """Same answer, and no second 'confirm' entry in the number's history."""
    await imported(redis, scripts)
    _, x, _, expire = await allocate(redis, scripts, "AXB", A, B, rid="00000000000000c1")
    first, second = await twice(redis, redis_sync, scripts.confirm, x, "00000000000000c1", "b1", expire + 60_000)
    assert first == second == ["ok", 1]
    # An extension (another expiry) is a change: recorded.
    assert await run(redis, scripts.confirm, x, "00000000000000c1", "b1", expire + 120_000) == ["ok", 1]
    kinds = [fields[b"kind"] for _, fields in redis_sync.xrange(f"{POOL}:hist:{x}")]
    assert kinds == [b"assign", b"confirm", b"confirm"]


async def test_cancel_repeated(redis: RedisClient, redis_sync: Any, scripts: Scripts) -> None:
    """The repeat answers 'missing' (the caller's cancel is then False: "there was none"), nothing else changes."""
    await imported(redis, scripts)
    _, x, _, _ = await allocate(redis, scripts, "AXB", A, B, rid="00000000000000d1")
    assert await twice(redis, redis_sync, scripts.cancel, x, "00000000000000d1", "binding deleted") == (
        ["ok", 0],
        ["missing"],
    )


async def test_replace_repeated(redis: RedisClient, redis_sync: Any, scripts: Scripts) -> None:
    """Without the 'done already' answer the repeat answered not_party (FAILED_PRECONDITION to the caller)."""
    await imported(redis, scripts)
    _, x, _, _ = await allocate(redis, scripts, "AXB", A, B, rid="00000000000000e1")
    assert await twice(redis, redis_sync, scripts.replace, x, "00000000000000e1", B, C) == (["ok"], ["ok"])
    fields = text(await redis.hgetall(f"{POOL}:h:{x}"))
    assert fields["r:00000000000000e1"] == f"AXB|{A}|{C}||" and fields[f"p:{C}"] == "00000000000000e1"
    # Still refused when neither party is the old one nor the new one.
    assert await run(redis, scripts.replace, x, "00000000000000e1", B, "13900000005") == ["not_party"]


async def test_release_lock_unlock_repeated(redis: RedisClient, redis_sync: Any, scripts: Scripts) -> None:
    """Same answers, one history entry each (lock's second entry is what the repeat added before)."""
    await imported(redis, scripts)
    free = BLOCK + "0300"
    released, again = await twice(redis, redis_sync, scripts.release, free, "ops", "why", 60_000)
    assert released[:2] == ["ok", "COOLING"] and again == released
    locked = BLOCK + "0301"
    assert await twice(redis, redis_sync, scripts.lock, locked, "abuse", "ops") == (
        ["ok", "LOCKED", 0, "", "abuse", 0],
        ["ok", "LOCKED", 0, "", "abuse", 0],
    )
    assert await twice(redis, redis_sync, scripts.unlock, locked, "ops") == (
        ["ok", "AVAILABLE", 0, "", "", 0],
        ["ok", "AVAILABLE", 0, "", "", 0],
    )
    kinds = [fields[b"kind"] for _, fields in redis_sync.xrange(f"{POOL}:hist:{locked}")]
    assert kinds == [b"lock", b"unlock"]
    # Locking again for another reason is a change: recorded.
    await run(redis, scripts.lock, free, "abuse", "ops")
    await run(redis, scripts.lock, free, "fraud", "ops")
    reasons = [fields[b"reason"] for _, fields in redis_sync.xrange(f"{POOL}:hist:{free}") if b"reason" in fields]
    assert reasons[-2:] == [b"abuse", b"fraud"]


async def test_import_and_claim_block_repeated(redis: RedisClient, redis_sync: Any, scripts: Scripts) -> None:
    """import_block: the repeat answers 0 added (what a caller's own retry is told too) and the count; claim_block:
    'mine'."""
    assert await twice(redis, redis_sync, scripts.import_block, BLOCK, 0, 1) == ([10_000, 1], [0, 1])
    # Into the sub-pools of a pool of three: the first fixes the count; the repeat adds nothing, changes nothing.
    layout = pool_keys.PoolLayout.of(TENANT, "021", 3)
    pattern = f"np:alloc:{{pool:{TENANT}:021*"
    for index, key in enumerate(layout.keys):
        args: list[str | int] = [TENANT, "021", RETENTION_MS, BLOCK, index, 3]
        first = text(await scripts.import_block(redis, [key], args))
        after_first = state(redis_sync, pattern)
        second = text(await scripts.import_block(redis, [key], args))
        assert state(redis_sync, pattern) == after_first
        assert (first, second) == ([pool_keys.subpool_share(index, 3), 3], [0, 3])
    claim_keys = [pool_keys.block_owner_key(BLOCK), pool_keys.block_history_key(BLOCK)]
    first = text(await scripts.claim_block(redis, claim_keys, [TENANT, CITY, "ops", "cm"]))
    owner = state(redis_sync, "np:alloc:{blk:" + BLOCK + "}*")
    second = text(await scripts.claim_block(redis, claim_keys, [TENANT, CITY, "ops", "cm"]))
    assert (first, second) == (["new"], ["mine"])
    assert state(redis_sync, "np:alloc:{blk:" + BLOCK + "}*") == owner


async def test_lock_unlock_repeated_record_one_event_each(
    redis: RedisClient, redis_sync: Any, scripts: Scripts
) -> None:
    """With the outbox of the sub-pool's slot (KEYS[2]): the lock and the unlock each record one event, however
    often they run; locking again for another reason records another."""
    await imported(redis, scripts)
    x = BLOCK + "0302"
    keys = [POOL, event_keys.outbox_key_beside(POOL)]

    def call(script: LuaScript, *args: str) -> Any:
        async def once() -> Any:
            return text(await script(redis, keys, [TENANT, CITY, RETENTION_MS, x, *args]))

        return once

    for script, args in ((scripts.lock, ("abuse", "ops")), (scripts.unlock, ("ops-2",))):
        first, second = await run_twice(redis_sync, (POOL_KEYS, "np:ev:*"), call(script, *args))
        assert first == second and first[0] == "ok"
    await call(scripts.lock, "abuse", "ops")()
    await call(scripts.lock, "fraud", "ops")()
    assert [(e["ty"], e["tn"], e["src"], e["n"], e["d"]) for e in outbox(redis_sync, POOL)] == [
        ("number.locked", TENANT, x, "", "abuse|ops"),
        ("number.unlocked", TENANT, x, "", "abuse|ops-2"),
        ("number.locked", TENANT, x, "", "abuse|ops"),
        ("number.locked", TENANT, x, "", "fraud|ops"),
    ]
