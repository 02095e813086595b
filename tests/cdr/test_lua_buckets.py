"""The scripts of the bucketed layout, called directly on a real Redis (either mode): bucket_count.lua (an owner's
bucket count, fixed by its first write), list_index.lua and read_entries.lua (a listing over several buckets)."""

from __future__ import annotations

from typing import Any

from numprotect.core.cdr_keys import Bucket, Buckets, count_key
from numprotect.core.redis_client import RedisClient
from numprotect.services.cdr.store import CdrStore
from support.redis_state import state


async def _count(redis: RedisClient, tenant_id: str, new_count: int) -> Any:
    return await CdrStore._bucket_count(redis, [count_key(tenant_id), Bucket(tenant_id).stream], [new_count])


async def test_bucket_count_is_fixed_by_the_first_write_and_an_old_stream_keeps_one(
    redis: RedisClient, redis_sync: Any
) -> None:
    assert await _count(redis, "t-new", 4) == 4  # a new owner: the count for new owners
    assert redis_sync.get(count_key("t-new")) == b"4"
    assert await _count(redis, "t-new", 8) == 4  # fixed once written, whatever the setting says now
    redis_sync.xadd(Bucket("t-old").stream, {"p": b"stored before buckets"})
    assert await _count(redis, "t-old", 4) == 1  # its records stay in bucket 0, where they are
    assert redis_sync.get(count_key("t-old")) == b"1"
    assert await _count(redis, "", 3) == 3  # the unmatched records are an owner too
    assert Buckets.of("", 3).all[0].stream == "np:cdr:{unmatched}:s"


async def test_bucket_count_repeated_answers_and_writes_what_the_first_run_did(
    redis: RedisClient, redis_sync: Any
) -> None:
    """A cluster client re-sends a script whose reply it lost (docs/redis-schema.md, "Scripts run twice")."""
    first = await _count(redis, "t-repeat", 4)
    after_first = state(redis_sync, Bucket("t-repeat").prefix + "*")
    assert await _count(redis, "t-repeat", 4) == first == 4
    assert state(redis_sync, Bucket("t-repeat").prefix + "*") == after_first


async def _index(redis: RedisClient, key: str, after: tuple[str, str, str], limit: int, low: str = "-inf") -> Any:
    reply = await CdrStore._list_index(redis, [key], [low, "+inf", *after, limit])
    pairs = [(reply[i].decode(), reply[i + 1].decode()) for i in range(1, len(reply), 2)]
    return reply[0], pairs


async def test_list_index_pages_by_score_then_member_and_counts_the_cursor_in_only_when_inclusive(
    redis: RedisClient, redis_sync: Any
) -> None:
    key = Buckets.of("t-index", 2).all[1].time_index
    # Members with equal scores are ordered bytewise, as Redis orders them: "5-10" before "5-9".
    redis_sync.zadd(key, {"1-0": 100, "5-10": 200, "5-9": 200, "6-0": 200, "7-0": 300})
    assert await _index(redis, key, ("", "", "0"), 2) == (1, [("100", "1-0"), ("200", "5-10")])
    assert await _index(redis, key, ("200", "5-10", "0"), 2) == (1, [("200", "5-9"), ("200", "6-0")])
    # Inclusive: the cursor's entry was in an earlier bucket, so an entry equal to it here still comes after.
    assert await _index(redis, key, ("200", "5-10", "1"), 2) == (1, [("200", "5-10"), ("200", "5-9")])
    assert await _index(redis, key, ("200", "6-0", "0"), 2) == (0, [("300", "7-0")])
    assert await _index(redis, key, ("300", "7-0", "0"), 5) == (0, [])
    assert await _index(redis, key, ("", "", "0"), 10, low="200") == (
        0,
        [("200", "5-10"), ("200", "5-9"), ("200", "6-0"), ("300", "7-0")],
    )
    assert await _index(redis, key, ("", "", "0"), 4, low="200") == (
        0,
        [("200", "5-10"), ("200", "5-9"), ("200", "6-0"), ("300", "7-0")],
    )  # exactly `limit` left: nothing more


async def test_read_entries_returns_the_records_asked_for_in_order_without_trimmed_ones(
    redis: RedisClient, redis_sync: Any
) -> None:
    stream = Buckets.of("t-read", 3).all[2].stream
    ids = [redis_sync.xadd(stream, {"p": f"r{i}".encode()}).decode() for i in range(4)]
    redis_sync.xdel(stream, ids[1])  # trimmed by the retention meanwhile
    reply = await CdrStore._read_entries(redis, [stream], [ids[3], ids[1], ids[0]])
    assert reply == [ids[3].encode(), b"r3", ids[0].encode(), b"r0"]
