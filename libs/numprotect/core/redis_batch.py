"""Independent Redis commands sent together: one round trip for writes that need not wait for each other.

Binding's create writes its record, its number's routes and history and its tenant index at once: keys in different
slots, so no script or transaction spans them, but none of them needs another's reply. `send_together` sends such
commands in one non-transactional pipeline (on a cluster, one per node, side by side) and returns each reply, or
the error Redis answered for it, in its place; the caller decides what a partial failure means. A script Redis does
not know yet (NOSCRIPT: it did not run) is loaded and sent again, as `LuaScript` does for a command sent alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

from numprotect.core.redis_client import KeyOrArg, LuaScript, RedisClient


@dataclass(frozen=True, slots=True)
class Command:
    """One command as sent: its words, and for EVALSHA the script it runs (loaded when Redis does not know it)."""

    words: tuple[KeyOrArg, ...]
    script: LuaScript | None = None

    @classmethod
    def of(cls, *words: KeyOrArg) -> Command:
        return cls(words)

    @classmethod
    def run(cls, script: LuaScript, keys: Sequence[KeyOrArg], args: Sequence[KeyOrArg] = ()) -> Command:
        return cls(("EVALSHA", script.sha, len(keys), *keys, *args), script)


async def send_together(redis: RedisClient, commands: Sequence[Command]) -> list[Any]:
    """The replies of `commands`, sent in one round trip; an error reply (a ResponseError, or on a cluster a node
    that failed under its commands) is returned in its command's place. A connection that fails before any reply
    raises, as a single command does."""
    replies = await _send(redis, commands)
    unknown = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if unknown:
        for script in dict.fromkeys(commands[i].script for i in unknown):
            if script is not None:
                await script.load(redis)
        for i, reply in zip(unknown, await _send(redis, [commands[i] for i in unknown]), strict=True):
            replies[i] = reply
    return replies


def raise_first(replies: Sequence[Any]) -> Sequence[Any]:
    """`replies` when none is an error; else raises the first error."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


async def _send(redis: RedisClient, commands: Sequence[Command]) -> list[Any]:
    if len(commands) == 1:  # a pipeline of one costs more than the command alone
        try:
            return [await redis.execute_command(*commands[0].words)]
        except ResponseError as exc:
            return [exc]
    async with redis.pipeline(transaction=False) as pipe:
        for command in commands:
            pipe.execute_command(*command.words)
        return list(await pipe.execute(raise_on_error=False))
