"""Redis client factory (redis.asyncio + hiredis; single node or cluster) and Lua scripts evaluated by SHA."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import NoScriptError

from numprotect_core.settings import RedisSettings

RedisClient = Redis | RedisCluster
KeyOrArg = str | bytes | int | float


def create_redis(settings: RedisSettings) -> RedisClient:
    """A client for the configured Redis; in cluster mode the URL names one node and the topology is discovered."""
    common: dict[str, Any] = {
        "socket_timeout": settings.timeout_seconds,
        "socket_connect_timeout": settings.timeout_seconds,
        "max_connections": settings.max_connections,
    }
    if settings.mode == "cluster":
        return RedisCluster.from_url(settings.url, **common)
    return Redis.from_url(settings.url, health_check_interval=30, **common)


async def redis_is_up(client: RedisClient) -> bool:
    """True when Redis answers PING (every node in cluster mode)."""
    try:
        if isinstance(client, RedisCluster):
            replies = await client.ping(target_nodes=RedisCluster.PRIMARIES)
            return bool(replies)
        return bool(await client.ping())
    except Exception:
        return False


class LuaScript:
    """A Lua script kept in a .lua file beside the code that calls it, evaluated by SHA.

    The first call on a Redis that has not seen the script loads it (NOSCRIPT), then EVALSHA is used
    again, so the steady state is one round trip per call.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.source = path.read_text(encoding="utf-8")
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()
        self.name = path.stem

    @classmethod
    def beside(cls, module_file: str, name: str) -> LuaScript:
        """The script `name` in the `lua/` folder next to `module_file`."""
        return cls(Path(module_file).with_name("lua") / name)

    async def __call__(self, client: RedisClient, keys: Sequence[KeyOrArg], args: Sequence[KeyOrArg] = ()) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)  # type: ignore[misc]
        except NoScriptError:
            await self.load(client)
            return await client.evalsha(self.sha, len(keys), *keys, *args)  # type: ignore[misc]

    async def load(self, client: RedisClient) -> None:
        if isinstance(client, RedisCluster):
            await client.script_load(self.source)  # the cluster client loads it on every primary
        else:
            await client.script_load(self.source)
