"""A paused or unreachable Redis answers UNAVAILABLE within the caller's deadline: a call never hangs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import redis
from redis.cluster import RedisCluster

from numprotect.core.routes import MODE_AXN
from numprotect.translation.v1 import translation_pb2 as pb

X = "700100000000001"
CALLER = "13700000003"


def _primaries(redis_sync: Any) -> list[redis.Redis]:
    if isinstance(redis_sync, RedisCluster):
        return [redis.Redis(host=n.host, port=n.port) for n in redis_sync.get_primaries()]
    kwargs = redis_sync.connection_pool.connection_kwargs
    return [redis.Redis(host=kwargs["host"], port=kwargs["port"])]


@pytest.fixture
def pause_redis(redis_sync: Any) -> Iterator[Any]:
    """Call it to pause every primary for 1 s (CLIENT PAUSE ALL); unpaused at the end of the test."""
    nodes = _primaries(redis_sync)

    def pause() -> None:
        for node in nodes:
            node.execute_command("CLIENT", "PAUSE", "1000", "ALL")

    yield pause
    for node in nodes:
        node.execute_command("CLIENT", "UNPAUSE")
        node.close()


async def test_paused_redis_is_unavailable_within_a_200ms_deadline(tr: Any, pause_redis: Any) -> None:
    await tr.put(tr.route("n1", MODE_AXN))
    assert (await tr.translate(CALLER)).decision == pb.DECISION_CONNECT
    pause_redis()
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await tr.translate(CALLER, deadline=0.2)
    elapsed = time.monotonic() - started
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    assert elapsed < 0.2


async def test_without_a_deadline_the_translation_timeout_bounds_the_wait(
    translation_factory: Any, pause_redis: Any
) -> None:
    tr = await translation_factory({"NUMPROTECT_TRANSLATION_REDIS_TIMEOUT": "300ms"})
    await tr.put(tr.route("n1", MODE_AXN))
    pause_redis()
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await tr.translate(CALLER, deadline=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert 0.25 < time.monotonic() - started < 1.0


async def test_translation_recovers_when_redis_answers_again(tr: Any, redis_sync: Any) -> None:
    await tr.put(tr.route("n1", MODE_AXN))
    nodes = _primaries(redis_sync)
    for node in nodes:
        node.execute_command("CLIENT", "PAUSE", "400", "ALL")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await tr.translate(CALLER, deadline=0.15)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    await asyncio.sleep(0.4)
    for node in nodes:
        node.close()
    assert (await tr.translate(CALLER, deadline=2)).decision == pb.DECISION_CONNECT
