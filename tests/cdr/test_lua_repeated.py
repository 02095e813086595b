"""ingest.lua run twice with the same arguments, as a cluster client does when it loses a reply and re-sends
(docs/redis-schema.md, "Scripts run twice"): the second run stores and counts nothing more, and answers what the
first answered (the stream ids), not "duplicate" for the records the first run stored."""

from __future__ import annotations

from typing import Any

from cdr.test_lua import _args

from numprotect.core.cdr_keys import Bucket
from numprotect.core.redis_client import RedisClient
from numprotect.services.cdr.store import ANSWER_KEEP_MS, CdrStore, answer_key
from support.redis_state import state

DAY = 86_400_000
X = "700100000000001"


def _call(bucket: Bucket, now_ms: int, call_ids: list[str]) -> tuple[list[Any], list[Any]]:
    """Keys and arguments of one ingest of `call_ids` (answered, abuse-counted), without an answer key."""
    window = now_ms - now_ms % 3_600_000
    keys: list[Any] = [bucket.stream, bucket.time_index]
    args: list[Any] = [180 * DAY, 2, len(call_ids)]
    for i, call_id in enumerate(call_ids):
        dedup = bucket.dedup("c", call_id)
        keys += [dedup, bucket.daily("20260301"), bucket.binding_index("b1"), dedup, bucket.abuse(window, X)]
        keys.append(bucket.abuse_flagged(window))
        args += _args(f"r{i}".encode(), now_ms - 5000 + i, 1 | 4 | 8 | 16, 2, "13711112222", window + 3 * 3_600_000)
    return keys, args


async def test_ingest_repeated_answers_the_first_runs_ids(redis: RedisClient, redis_sync: Any, now_ms: int) -> None:
    bucket = Bucket("t-repeat")
    redis_sync.set(bucket.dedup("c", "seen"), "1-1")  # stored by an earlier call: a real duplicate
    keys, args = _call(bucket, now_ms, ["c1", "seen", "c2"])
    keys.append(answer_key(bucket))
    args.append(ANSWER_KEEP_MS)
    first = await CdrStore._ingest(redis, keys, args)
    after_first = state(redis_sync, bucket.prefix + "*")
    second = await CdrStore._ingest(redis, keys, args)
    assert state(redis_sync, bucket.prefix + "*") == after_first
    assert first[1] == 0 and first[0] and first[2]
    assert second[:3] == first[:3] and int(second[3]) == first[3]  # the pairs it flagged: the same answer again
    assert redis_sync.xlen(bucket.stream) == 2
    assert redis_sync.hget(bucket.daily("20260301"), "calls") == b"2"
    assert 0 < redis_sync.pttl(keys[-1]) <= ANSWER_KEEP_MS


async def test_ingest_without_an_answer_key_answers_duplicate_on_a_repeat(
    redis: RedisClient, redis_sync: Any, now_ms: int
) -> None:
    """What a repeat answered before the answer key (and still does for a caller that passes none): the records are
    stored once, the repeat calls them duplicates."""
    bucket = Bucket("t-repeat-old")
    keys, args = _call(bucket, now_ms, ["c1"])
    first = await CdrStore._ingest(redis, keys, args)
    assert await CdrStore._ingest(redis, keys, args) == [0, 0]
    assert first[0] and redis_sync.xlen(bucket.stream) == 1
