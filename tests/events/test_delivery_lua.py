"""claim.lua, settle.lua and redrive.lua called directly on a real Redis (either mode): leases, the concurrency
limit, pauses, dead letters, late settles, deleted endpoints."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from numprotect.core.event_keys import TenantKeys
from numprotect.core.redis_client import create_redis
from numprotect.core.settings import Env, RedisSettings
from numprotect.services.events.deliveries import Deliveries
from numprotect.services.events.dispatcher import Dispatcher

TENANT = "t-lua"
EP = "ep_lua"
KEYS = TenantKeys(TENANT)
LOST = "no result within the lease: the dispatcher sending it was lost"


@pytest.fixture
async def redis(redis_env: dict[str, str]) -> AsyncIterator[Any]:
    client = create_redis(RedisSettings.from_env(Env(redis_env)))
    yield client
    await client.aclose()


def claim_keys() -> list[str]:
    return [
        KEYS.ready,
        KEYS.log,
        KEYS.queue(EP),
        KEYS.in_flight(EP),
        KEYS.attempts(EP),
        KEYS.state(EP),
        KEYS.dead(EP),
        KEYS.dead_errors(EP),
    ]


def settle_keys() -> list[str]:
    return [
        KEYS.endpoints,
        KEYS.ready,
        KEYS.queue(EP),
        KEYS.in_flight(EP),
        KEYS.attempts(EP),
        KEYS.dead(EP),
        KEYS.dead_errors(EP),
        KEYS.deliveries(EP),
        KEYS.state(EP),
    ]


async def claim(redis: Any, *, lease_ms: int = 100, limit: int = 1, batch: int = 2, attempts: int = 3) -> Any:
    return await Dispatcher._claim_script(redis, claim_keys(), [lease_ms, 10, attempts, EP, limit, batch])


async def settle(
    redis: Any,
    lease_end: int,
    events: list[tuple[str, int]],
    outcome: str,
    *,
    status: int = 500,
    retry_after: int = -1,
    delay: int = 1000,
) -> Any:
    args: list[Any] = [EP, lease_end, outcome, status, 1234, "" if outcome == "ok" else f"HTTP {status}", retry_after]
    args += [100, 400, 3_600_000, 3, 1_700_000_000_000]
    for log_id, attempt in events:
        args += [log_id, f"evt_{log_id}", "binding.created", attempt, delay]
    return await Dispatcher._settle_script(redis, settle_keys(), args)


async def queued(redis: Any, count: int) -> list[str]:
    """`count` events logged and queued due now (the enqueue step), their log ids."""
    ids = []
    for n in range(count):
        log_id = (await redis.xadd(KEYS.log, {"id": f"evt_{n}", "ty": "binding.created", "at": 1, "p": "{}"})).decode()
        await redis.hset(KEYS.attempts(EP), log_id, 0)
        await redis.zadd(KEYS.queue(EP), {log_id: 0})
        ids.append(log_id)
    await redis.zadd(KEYS.ready, {EP: 0})
    await redis.hset(KEYS.endpoints, EP, b"stored endpoint")
    return ids


async def test_claim_takes_due_work_within_the_limit_and_takes_a_lost_lease_again(redis: Any) -> None:
    ids = await queued(redis, 3)
    now, next_ms, dead, dropped, [request] = await claim(redis)
    ep, lease_end, events = request
    assert (ep, dead, dropped) == (EP.encode(), 0, 0)
    assert lease_end == now + 100
    assert [(e[0].decode(), e[1], e[4]) for e in events] == [(ids[0], b"evt_0", 1), (ids[1], b"evt_1", 1)]
    # The one request slot is taken: nothing more until it is settled or its lease ends; ready = the lease end.
    assert next_ms == lease_end
    assert await redis.zscore(KEYS.ready, EP) == lease_end
    assert (await claim(redis))[4] == []
    await asyncio.sleep(0.15)
    _, _, _, _, [again] = await claim(redis, batch=3)
    # The lost lease: its two events are due again (second attempt), with the third.
    assert sorted((e[0].decode(), e[4]) for e in again[2]) == [(ids[0], 2), (ids[1], 2), (ids[2], 1)]
    # A settle under the lost lease is late: recorded, nothing else.
    late = await settle(redis, lease_end, [(ids[0], 1), (ids[1], 1)], "ok", status=200)
    assert late[0:2] == [0, 0]
    assert await redis.zcard(KEYS.in_flight(EP)) == 3
    assert await redis.xlen(KEYS.deliveries(EP)) == 1
    # The current lease's settle: all forgotten.
    settled = await settle(redis, again[1], [(ids[0], 2), (ids[1], 2), (ids[2], 1)], "ok", status=200)
    assert settled[0:2] == [3, 0]
    assert await redis.hgetall(KEYS.attempts(EP)) == {}
    assert await redis.zcard(KEYS.in_flight(EP)) == 0
    assert (await claim(redis))[4] == []


async def test_claim_with_room_for_two_requests_makes_two(redis: Any) -> None:
    await queued(redis, 3)
    _, _, _, _, requests = await claim(redis, limit=2, batch=2)
    assert [len(r[2]) for r in requests] == [2, 1]
    assert requests[0][1] != requests[1][1]  # one lease end per request
    assert await redis.zcard(KEYS.queue(EP)) == 0
    assert await redis.zcard(KEYS.in_flight(EP)) == 3


async def test_a_lost_lease_after_the_last_attempt_is_a_dead_letter(redis: Any) -> None:
    [log_id] = await queued(redis, 1)
    await claim(redis, attempts=1)
    await asyncio.sleep(0.15)
    _, next_ms, dead, _, requests = await claim(redis, attempts=1)
    assert (dead, requests, next_ms) == (1, [], -1)
    assert await redis.zscore(KEYS.dead(EP), log_id) is not None
    assert await redis.hget(KEYS.dead_errors(EP), log_id) == LOST.encode()
    assert await redis.zscore(KEYS.ready, EP) is None  # nothing left to claim


async def test_an_event_gone_from_the_log_is_dropped(redis: Any) -> None:
    [log_id] = await queued(redis, 1)
    await redis.xdel(KEYS.log, log_id)
    _, _, _, dropped, requests = await claim(redis)
    assert (dropped, requests) == (1, [])
    assert await redis.hgetall(KEYS.attempts(EP)) == {}


async def test_settle_requeues_after_the_delay_or_retry_after_and_pauses_on_slow_answers(redis: Any) -> None:
    ids = await queued(redis, 2)
    _, _, _, _, [request] = await claim(redis)
    settled, dead, next_due, now = await settle(redis, request[1], [(ids[0], 1), (ids[1], 1)], "slow", delay=1000)
    assert (settled, dead) == (2, 0)
    assert next_due == now + 1000
    assert await redis.zscore(KEYS.queue(EP), ids[0]) == now + 1000
    assert await redis.zscore(KEYS.ready, EP) <= now + 1000  # (LT: it may stay at the lease's end)
    state = await redis.hgetall(KEYS.state(EP))
    assert (state[b"fails"], int(state[b"pause"])) == (b"1", now + 100)  # the first backoff
    # Again: the backoff doubles; a Retry-After later than the delay wins for the event and the pause.
    await redis.zadd(KEYS.queue(EP), {ids[0]: 0, ids[1]: 0})
    await redis.zadd(KEYS.ready, {EP: 0})
    await redis.hset(KEYS.state(EP), "pause", 0)
    _, _, _, _, [request] = await claim(redis)
    settled, _, next_due, now = await settle(
        redis, request[1], [(ids[0], 2), (ids[1], 2)], "slow", retry_after=5000, delay=10
    )
    assert next_due <= now + 5000 and await redis.zscore(KEYS.queue(EP), ids[0]) == now + 5000
    assert int(await redis.hget(KEYS.state(EP), "pause")) == now + 5000
    assert await redis.hget(KEYS.state(EP), "fails") == b"2"
    # Paused: due work is not claimed; ready moves to the pause's end.
    await redis.zadd(KEYS.queue(EP), {ids[0]: 0})
    await redis.zadd(KEYS.ready, {EP: 0})
    now, next_ms, _, _, requests = await claim(redis)
    assert requests == [] and next_ms == int(await redis.hget(KEYS.state(EP), "pause"))
    # A success resets the failure count.
    await redis.hset(KEYS.state(EP), "pause", 0)
    await redis.zadd(KEYS.ready, {EP: 0})
    _, _, _, _, [request] = await claim(redis)
    await settle(redis, request[1], [(e[0].decode(), int(e[4])) for e in request[2]], "ok", status=200)
    assert await redis.hget(KEYS.state(EP), "fails") is None


async def test_settle_after_the_last_attempt_makes_a_dead_letter_and_records_every_attempt(
    redis: Any,
) -> None:
    [log_id] = await queued(redis, 1)
    await redis.hset(KEYS.attempts(EP), log_id, 2)
    _, _, _, _, [request] = await claim(redis)
    assert request[2][0][4] == 3
    settled, dead, next_due, _ = await settle(redis, request[1], [(log_id, 3)], "fail", status=400)
    assert (settled, dead, next_due) == (1, 1, -1)
    assert await redis.hget(KEYS.dead_errors(EP), log_id) == b"HTTP 400"
    [(_, fields)] = await redis.xrange(KEYS.deliveries(EP))
    assert fields == {
        b"t": b"1700000000000",
        b"s": b"400",
        b"l": b"1234",
        b"e": b"HTTP 400",
        b"ids": f"evt_{log_id}".encode(),
        b"ty": b"binding.created",
        b"n": b"3",
    }
    # Replayed (queued again as ReplayEvents does) and delivered: no dead letter any more.
    await redis.hset(KEYS.attempts(EP), log_id, 0)
    await redis.zadd(KEYS.queue(EP), {log_id: 0})
    await redis.zadd(KEYS.ready, {EP: 0})
    _, _, _, _, [replayed] = await claim(redis)
    assert (await settle(redis, replayed[1], [(log_id, 1)], "ok", status=200))[0:2] == [1, 0]
    assert await redis.zcard(KEYS.dead(EP)) == 0
    assert await redis.hlen(KEYS.dead_errors(EP)) == 0


async def test_settle_for_a_deleted_endpoint_writes_nothing(redis: Any) -> None:
    [log_id] = await queued(redis, 1)
    _, _, _, _, [request] = await claim(redis)
    await redis.delete(KEYS.endpoints, *KEYS.endpoint_keys(EP))
    assert (await settle(redis, request[1], [(log_id, 1)], "slow"))[0:3] == [0, 0, -1]
    assert await redis.exists(*KEYS.endpoint_keys(EP)) == 0


async def test_redrive_script_puts_dead_letters_back_with_attempts_reset(redis: Any, redis_env: Any) -> None:
    ids = await queued(redis, 2)
    await redis.delete(KEYS.queue(EP), KEYS.ready)
    await redis.zadd(KEYS.dead(EP), {ids[0]: 5})
    await redis.hset(KEYS.dead_errors(EP), ids[0], "HTTP 500")
    await redis.hset(KEYS.attempts(EP), ids[0], 3)
    script_keys = [KEYS.dead(EP), KEYS.dead_errors(EP), KEYS.queue(EP), KEYS.attempts(EP), KEYS.ready]
    assert await Deliveries._redrive(redis, script_keys, [EP, ids[0], ids[1]]) == 1  # ids[1] is no dead letter
    assert await redis.zcard(KEYS.dead(EP)) == 0
    assert await redis.hget(KEYS.dead_errors(EP), ids[0]) is None
    assert await redis.hget(KEYS.attempts(EP), ids[0]) == b"0"
    assert [m.decode() for m in await redis.zrange(KEYS.queue(EP), 0, -1)] == [ids[0]]
    assert await redis.zscore(KEYS.ready, EP) is not None
    assert await Deliveries._redrive(redis, script_keys, [EP, ids[0]]) == 0
