"""What Redis holds under a key pattern, as plain values: to show that a script run twice left what it left once.

Works on a standalone or cluster client (redis-py, blocking; the cluster client scans every primary). TTLs are
left out (they tick); every key's type and contents are in, streams with their entry ids (an appended duplicate
event shows).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


def plain(value: Any) -> Any:
    """A reply of a client without decode_responses with its bytes as text (nested lists and dicts too)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    return value


def state(redis_sync: Any, pattern: str) -> dict[str, tuple[str, Any]]:
    """key -> (type, contents) of every key matching `pattern` (a SCAN pattern)."""
    out: dict[str, tuple[str, Any]] = {}
    for raw in redis_sync.scan_iter(match=pattern, count=1000):
        key = plain(raw)
        kind = plain(redis_sync.type(key))
        contents: Any
        if kind == "string":
            contents = redis_sync.get(key)
        elif kind == "hash":
            contents = redis_sync.hgetall(key)
        elif kind == "set":
            contents = sorted(redis_sync.smembers(key))
        elif kind == "zset":
            contents = redis_sync.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            contents = redis_sync.xrange(key)
        elif kind == "list":
            contents = redis_sync.lrange(key, 0, -1)
        else:  # "none": the key lapsed between SCAN and the read
            continue
        out[key] = (kind, plain(contents))
    return out


async def run_twice(redis_sync: Any, pattern: str | tuple[str, ...], call: Callable[[], Awaitable[T]]) -> tuple[T, T]:
    """Both answers of `call` made twice; asserts the second made no change to the keys under `pattern` (or under
    each of several patterns)."""
    patterns = (pattern,) if isinstance(pattern, str) else pattern
    first = await call()
    after_first = [state(redis_sync, p) for p in patterns]
    second = await call()
    assert [state(redis_sync, p) for p in patterns] == after_first
    return first, second
