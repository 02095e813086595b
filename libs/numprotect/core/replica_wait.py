"""Waiting for replicas (Redis WAIT) after acknowledged writes: NUMPROTECT_REDIS_WAIT_REPLICAS.

Redis replicates asynchronously: a master that dies right after answering a write may take it with it, and its
promoted replica never had it. With NUMPROTECT_REDIS_WAIT_REPLICAS=n, the writes of a binding or a CDR batch are
acknowledged only once n replicas of each master that took them have them (docs/operations.md "Waiting for
replicas").

WAIT counts the replicas that have everything *its own connection* wrote; the writes themselves go out on any
pooled connection (and in scripts beside their callers). So each wait is a pipeline on one connection to the master
of the written keys: a short-lived marker write with their hash tag (same slot, same master), then WAIT. A master
executes commands one at a time and the writes were acknowledged before the marker was sent, so the marker's
replication offset is past theirs: a replica that has the marker has them too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import redis.exceptions
from redis.asyncio import RedisCluster

from numprotect.core.errors import Unavailable
from numprotect.core.redis_client import RedisClient, is_cluster
from numprotect.core.settings import RedisSettings

# The marker only has to reach the replicas; it expires on its own.
MARKER_TTL_MS = 10_000


def hash_tag(key: str) -> str:
    """The part of `key` Redis Cluster hashes: the first non-empty {...}, else the whole key."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


class ReplicaWait:
    """After acknowledged writes, waits until `replicas` replicas of their masters have them (off when 0)."""

    def __init__(self, redis: RedisClient, replicas: int, timeout_seconds: float) -> None:
        self.redis = redis
        self.replicas = replicas
        self.timeout_ms = max(1, round(timeout_seconds * 1000))

    @classmethod
    def of(cls, redis: RedisClient, settings: RedisSettings) -> ReplicaWait:
        return cls(redis, settings.wait_replicas, settings.wait_timeout_seconds)

    async def after(self, keys: Iterable[str]) -> None:
        """Returns once the writes to `keys` (acknowledged already) are on enough replicas.

        Raises Unavailable when they are not within the timeout: the writes stay on the master but are not
        confirmed, so the caller must not be told OK; retrying the same request is safe (bindings are idempotent by
        out_order_id, CDRs by call_id) and waits again.
        """
        if not self.replicas:
            return
        tags = {hash_tag(key) for key in keys}
        if not is_cluster(self.redis):
            tags = set(list(tags)[:1])  # one master: one marker covers every earlier write
        await asyncio.gather(*(self._wait(f"np:wait:{{{tag}}}") for tag in tags))

    async def _wait(self, marker: str) -> None:
        try:
            acknowledged = await self._marker_then_wait(marker)
        except redis.exceptions.ResponseError as exc:  # MOVED, CLUSTERDOWN, READONLY, ...: not confirmed
            raise Unavailable(f"storage could not confirm the write on its replicas ({exc}); retry") from None
        if acknowledged < self.replicas:
            raise Unavailable(
                f"storage confirmed the write on {acknowledged} of {self.replicas} replica(s) within "
                f"{self.timeout_ms} ms (NUMPROTECT_REDIS_WAIT_REPLICAS): not acknowledged; retry"
            )

    async def _marker_then_wait(self, marker: str) -> int:
        """SET marker, then WAIT, on one connection; the number of replicas that acknowledged."""
        commands = (("SET", marker, "1", "PX", MARKER_TTL_MS), ("WAIT", self.replicas, self.timeout_ms))
        # redis.asyncio, or the multiplexing client, which sends a pipeline holding WAIT on a connection of its own
        # to the master of the marker's slot, and hands a redirection back as an error (redis_mux._run_pinned).
        if not isinstance(self.redis, RedisCluster):
            async with self.redis.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                _, acknowledged = await pipe.execute()
            return int(acknowledged)
        # A cluster pipeline would send a redirected marker again on another connection (and WAIT would then
        # count nothing of it): one connection of the slot's master, and a redirection is an error here.
        node = self.redis.get_node_from_key(marker)
        if node is None:
            raise Unavailable("storage: no cluster node serves the written keys now; retry")
        connection = node.acquire_connection()
        try:
            await connection.send_packed_command(connection.pack_commands(commands))
            await connection.read_response()
            acknowledged = await connection.read_response()
        except BaseException:
            await asyncio.shield(connection.disconnect())  # a reply may still be on its way: never reuse it
            raise
        finally:
            node.release(connection)
        return int(acknowledged)
