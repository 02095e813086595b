"""Walks every key under np:* with SCAN (never KEYS), node by node on a cluster, at a bounded pace."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from redis.asyncio import RedisCluster

from numprotect.core.redis_client import RedisClient, as_text


@dataclass
class Pace:
    """At most `keys_per_second` keys handed out per second (0: no limit), in batches of about `batch`."""

    batch: int
    keys_per_second: float
    _started: float = 0.0
    _done: int = 0

    async def took(self, n: int) -> None:
        """Called after `n` more keys were handed out: sleeps until the rate allows the next batch."""
        if self.keys_per_second <= 0:
            return
        now = time.monotonic()
        if not self._started:
            self._started = now
        self._done += n
        ahead = self._done / self.keys_per_second - (now - self._started)
        if ahead > 0:
            await asyncio.sleep(ahead)


async def primaries(redis: RedisClient) -> list[object]:
    """The nodes whose keys are scanned: every primary of a cluster, or [None] for a standalone server."""
    if isinstance(redis, RedisCluster):
        return list(redis.get_primaries())
    return [None]


async def scan_batches(redis: RedisClient, pace: Pace, match: str = "np:*") -> AsyncIterator[list[str]]:
    """Batches of key names, every primary in turn; a key may come twice (SCAN's guarantee), none is missed
    that existed for the whole walk. Memory: one batch."""
    for node in await primaries(redis):
        cursor = 0
        while True:
            if node is None:
                cursor, raw = await redis.scan(cursor=cursor, match=match, count=pace.batch)
            else:
                assert isinstance(redis, RedisCluster)
                reply = await redis.execute_command(
                    "SCAN", cursor, "MATCH", match, "COUNT", pace.batch, target_nodes=node
                )
                cursor, raw = _one_node_reply(reply)
            keys = [as_text(k) for k in raw]
            if keys:
                yield keys
                await pace.took(len(keys))
            if int(cursor) == 0:
                break


def _one_node_reply(reply: object) -> tuple[int, list[bytes | str]]:
    # redis-py's cluster client answers SCAN on one node as ({node_name: cursor}, keys).
    assert isinstance(reply, list | tuple)
    cursor, keys = reply
    if isinstance(cursor, dict):
        (cursor,) = cursor.values()
    return int(cursor), list(keys)


async def server_time_ms(redis: RedisClient) -> int:
    """Redis's clock (the one that expires keys and that the allocation scripts read), in ms."""
    if isinstance(redis, RedisCluster):
        reply = await redis.time(target_nodes=redis.get_random_node())
    else:
        reply = await redis.time()
    seconds, micros = reply
    return int(seconds) * 1000 + int(micros) // 1000
