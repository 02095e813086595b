"""claim.lua, settle.lua and redrive.lua run twice with the same arguments, as a cluster client does when it loses
a reply and re-sends (docs/redis-schema.md, "Scripts run twice"): what the repeat answers and leaves behind."""

from __future__ import annotations

import asyncio
from typing import Any

from events import test_delivery_lua
from events.test_delivery_lua import EP, KEYS, TENANT, claim, queued, settle

from numprotect.services.events.deliveries import Deliveries
from support.redis_state import plain, run_twice, state

redis = test_delivery_lua.redis  # the fixture: an asyncio client of the Redis under test
# Every key of the tenant's slot but the delivery attempts stream (compared on its own).
TENANT_KEYS = f"np:ev:{{ev:t:{TENANT}}}:*"


def without_attempts(redis_sync: Any) -> dict[str, Any]:
    return {k: v for k, v in state(redis_sync, TENANT_KEYS).items() if k != KEYS.deliveries(EP)}


async def test_a_repeated_claim_takes_no_second_request_and_the_lost_one_comes_back_after_its_lease(
    redis: Any, redis_sync: Any
) -> None:
    ids = await queued(redis, 2)
    first = await claim(redis, batch=1)  # the reply a client lost
    second = await claim(redis, batch=1)
    assert len(first[4]) == 1 and second[4] == []  # the endpoint's one request slot is the lost claim's
    await asyncio.sleep(0.15)  # its lease (100 ms) ends
    [request] = (await claim(redis, batch=2))[4]
    assert sorted((plain(e[0]), e[4]) for e in request[2]) == [(ids[0], 2), (ids[1], 1)]  # one attempt used


async def test_a_repeated_settle_settles_nothing_again_and_records_the_attempt_twice(
    redis: Any, redis_sync: Any
) -> None:
    ids = await queued(redis, 1)
    [request] = (await claim(redis))[4]
    events = [(ids[0], 1)]
    first = await settle(redis, request[1], events, "fail", status=400, delay=60_000)
    after_first = without_attempts(redis_sync)
    second = await settle(redis, request[1], events, "fail", status=400, delay=60_000)
    assert first[0:2] == [1, 0] and second[0:2] == [0, 0]
    assert without_attempts(redis_sync) == after_first  # queued once, due as the first run said
    assert await redis.xlen(KEYS.deliveries(EP)) == 2  # ListDeliveries shows the attempt twice

    # A slow answer's repeat also counts the endpoint's failure again: its next pause doubles once more.
    await redis.zadd(KEYS.queue(EP), {ids[0]: 0})
    await redis.zadd(KEYS.ready, {EP: 0})
    [request] = (await claim(redis))[4]
    await settle(redis, request[1], [(ids[0], 2)], "slow", delay=60_000)
    await settle(redis, request[1], [(ids[0], 2)], "slow", delay=60_000)
    assert await redis.hget(KEYS.state(EP), "fails") == b"2"


async def test_a_repeated_redrive_puts_nothing_back_again(redis: Any, redis_sync: Any) -> None:
    [log_id] = await queued(redis, 1)
    await redis.delete(KEYS.queue(EP), KEYS.ready)
    await redis.zadd(KEYS.dead(EP), {log_id: 5})
    await redis.hset(KEYS.dead_errors(EP), log_id, "HTTP 500")
    script_keys = [KEYS.dead(EP), KEYS.dead_errors(EP), KEYS.queue(EP), KEYS.attempts(EP), KEYS.ready]
    answers = await run_twice(redis_sync, TENANT_KEYS, lambda: Deliveries._redrive(redis, script_keys, [EP, log_id]))
    assert answers == (1, 0)
