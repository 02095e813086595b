"""One key of every slot read cheaply: the sweeps of the router (which outboxes hold entries) and of the expirer
(each slot's earliest binding expiry).

16384 commands in a redis-py pipeline cost the client ~0.3 s of CPU (standalone; ~0.65 s on a cluster), too much
for a safety net that runs every sweep interval in every events process. sweep.lua reads thousands of keys per
call instead (~40 ms of client CPU for all slots): on a cluster, per node, the keys of the slots the node serves
(allow-cross-slot-keys; the keys are passed as arguments, which the cluster does not route by). A call that fails
(a slot moved during a resharding, a key of another type) is done again one slot at a time in a pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

from redis.asyncio import RedisCluster
from redis.exceptions import NoScriptError, RedisError

from numprotect.core.event_keys import CLUSTER_SLOTS
from numprotect.core.redis_client import LuaScript, RedisClient, as_text, is_cluster

Reading = Literal["length", "earliest"]
# Keys per sweep.lua call (and per pipeline of the slot-by-slot fallback).
KEYS_PER_CALL = 4096

_sweep = LuaScript.beside(__file__, "sweep.lua")


async def sweep_slots(
    redis: RedisClient, reading: Reading, key_of: Callable[[int], str], slots: Sequence[int] = range(CLUSTER_SLOTS)
) -> dict[int, int]:
    """slot -> the XLEN of its stream ("length") or the lowest score of its zset ("earliest"), for the slots whose
    key is not empty."""
    found: dict[int, int] = {}
    # A cluster client without redis-py's node map (the multiplexing one) could not aim a call at a node.
    by_script = isinstance(redis, RedisCluster) or not is_cluster(redis)
    for node, group in _by_node(redis, slots):
        for start in range(0, len(group), KEYS_PER_CALL):
            chunk = group[start : start + KEYS_PER_CALL]
            try:
                if not by_script:
                    raise RedisError("read slot by slot")
                reply = await _call(redis, node, reading, [key_of(slot) for slot in chunk])
            except RedisError:
                found.update(await _one_by_one(redis, reading, key_of, chunk))
                continue
            for i in range(0, len(reply), 2):
                found[chunk[int(reply[i])]] = int(float(as_text(reply[i + 1])))
    return found


def _by_node(redis: RedisClient, slots: Sequence[int]) -> list[tuple[Any, list[int]]]:
    """The slots grouped by the node serving them (None: a standalone Redis, or a client that routes by itself)."""
    if not isinstance(redis, RedisCluster):
        return [(None, list(slots))]
    groups: dict[str, tuple[Any, list[int]]] = {}
    for slot in slots:
        node = redis.nodes_manager.get_node_from_slot(slot)
        groups.setdefault(node.name, (node, []))[1].append(slot)
    return list(groups.values())


async def _call(redis: RedisClient, node: Any, reading: Reading, keys: Sequence[str]) -> Any:
    options = {} if node is None else {"target_nodes": node}
    try:
        return await redis.execute_command("EVALSHA", _sweep.sha, 0, reading, *keys, **options)
    except NoScriptError:
        await _sweep.load(redis)
        return await redis.execute_command("EVALSHA", _sweep.sha, 0, reading, *keys, **options)


async def _one_by_one(
    redis: RedisClient, reading: Reading, key_of: Callable[[int], str], slots: Sequence[int]
) -> dict[int, int]:
    async with redis.pipeline(transaction=False) as pipe:
        for slot in slots:
            if reading == "length":
                pipe.xlen(key_of(slot))
            else:
                pipe.zrange(key_of(slot), 0, 0, withscores=True)
        replies = await pipe.execute(raise_on_error=False)
    found: dict[int, int] = {}
    for slot, reply in zip(slots, replies, strict=True):
        if isinstance(reply, Exception):  # a key of another type: no events there
            continue
        if reading == "length" and reply:
            found[slot] = int(reply)
        elif reading == "earliest" and reply:
            found[slot] = int(reply[0][1])
    return found


def error_text(error: BaseException) -> str:
    """An error for a log line: its class and message (redis-py's repr of an error reply drops the message)."""
    return f"{type(error).__name__}: {error}"
