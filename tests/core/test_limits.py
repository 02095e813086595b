"""The concurrency limit, alone and in front of a real Redis (standalone, or a cluster with
NUMPROTECT_TEST_REDIS_MODE=cluster)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
import redis

from numprotect.core.errors import ResourceExhausted, Unavailable
from numprotect.core.limits import ConcurrencyLimit
from numprotect.core.redis_client import create_redis
from numprotect.core.settings import Env, RedisSettings


def _settings(redis_env: dict[str, str], **extra: str) -> RedisSettings:
    return RedisSettings.from_env(Env({**redis_env, **extra}))


async def test_holders_never_exceed_the_limit_and_all_get_through() -> None:
    limit = ConcurrencyLimit(3, wait_seconds=5, name="things")
    peak = 0

    async def work() -> None:
        nonlocal peak
        async with limit:
            peak = max(peak, limit.held)
            await asyncio.sleep(0.01)

    await asyncio.gather(*(work() for _ in range(40)))
    assert peak == 3 and limit.held == 0


async def test_a_waiter_past_the_wait_gets_unavailable_and_leaks_no_place() -> None:
    limit = ConcurrencyLimit(1, wait_seconds=0.05, name="redis operations")
    release = asyncio.Event()

    async def hold() -> None:
        async with limit:
            await release.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)
    started = time.monotonic()
    with pytest.raises(Unavailable) as caught:
        async with limit:
            pass
    assert time.monotonic() - started >= 0.04
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE and "limit 1" in caught.value.message
    release.set()
    await holder
    async with limit:  # the timed-out waiter took nothing away
        assert limit.held == 1
    assert limit.held == 0


async def test_a_hard_cap_refuses_at_once_with_resource_exhausted() -> None:
    limit = ConcurrencyLimit(1, wait_seconds=0, name="watchers", exhausted=True)
    async with limit:
        with pytest.raises(ResourceExhausted) as caught:
            async with limit:
                pass
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and caught.value.subject == "watchers"
    async with limit:
        pass


async def test_a_cancelled_waiter_leaks_no_place() -> None:
    limit = ConcurrencyLimit(1, wait_seconds=10, name="x")
    async with limit:
        waiter = asyncio.create_task(limit.__aenter__())
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    assert limit.held == 0
    async with limit:
        assert limit.held == 1


async def test_for_redis_bounds_a_burst_to_the_pool_size_on_a_real_redis(redis_env: dict[str, str]) -> None:
    """More concurrent operations than connections: without the limit the asyncio client fails some
    (Too many connections / MaxConnectionsError); with it every one completes."""
    settings = _settings(redis_env, NUMPROTECT_REDIS_MAX_CONNECTIONS="4", NUMPROTECT_REDIS_TIMEOUT="5s")
    client = create_redis(settings)
    limit = ConcurrencyLimit.for_redis(settings)
    assert (limit.limit, limit.wait_seconds) == (4, 5.0)
    try:

        async def blocking_read(i: int, limited: bool) -> Any:
            if not limited:
                return await client.blpop([f"np:test:{{limit}}:{i}"], timeout=0.2)
            async with limit:
                return await client.blpop([f"np:test:{{limit}}:{i}"], timeout=0.2)

        unlimited = await asyncio.gather(*(blocking_read(i, False) for i in range(12)), return_exceptions=True)
        assert any(isinstance(r, redis.exceptions.ConnectionError) for r in unlimited)
        limited = await asyncio.gather(*(blocking_read(i, True) for i in range(12)), return_exceptions=True)
        assert limited == [None] * 12
    finally:
        await client.aclose()
