"""ingest.lua run twice with the same arguments, as a cluster client does when it loses a reply and re-sends
(docs/redis-schema.md, "Scripts run twice"): the second run stores and counts nothing more, and answers what the
first answered (the stream ids), not "duplicate" for the records the first run stored."""

from __future__ import annotations

from typing import Any

from cdr.test_lua import _args

from numprotect.core import event_keys
from numprotect.core.cdr_keys import Bucket
from numprotect.core.redis_client import RedisClient
from numprotect.services.cdr.store import ANSWER_KEEP_MS, CdrStore, answer_key
from support.event_outbox import outbox
from support.redis_state import run_twice, state

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


async def test_ingest_repeated_records_its_events_once(redis: RedisClient, redis_sync: Any, now_ms: int) -> None:
    """With the outbox of the bucket's slot: the repeat (its kept answer) records nothing again; a repeat that finds
    no kept answer records nothing either (the dedup keys, the flagged set)."""
    for answered in (True, False):
        bucket = Bucket(f"t-events-{answered}")
        keys, args = _call(bucket, now_ms, ["c1", "c2"])
        if answered:
            keys.append(answer_key(bucket))
            args.append(ANSWER_KEEP_MS)
        else:  # its answer lost before the repeat (deleted below): only the dedup keys and the flagged set guard
            keys.append(bucket.prefix + "ing:lost")
            args.append(ANSWER_KEEP_MS)
        keys.append(event_keys.outbox_key_beside(bucket.stream))
        args += [bucket.tenant_id, 3_600_000]

        async def ingest(keys: list[Any] = keys, args: list[Any] = args) -> Any:
            return await CdrStore._ingest(redis, keys, args)

        if answered:
            first, second = await run_twice(redis_sync, (bucket.prefix + "*", "np:ev:*"), ingest)
            assert second[:2] == first[:2]
        else:
            await ingest()
            redis_sync.delete(bucket.prefix + "ing:lost")
            await ingest()
        entries = outbox(redis_sync, bucket.stream)
        flagged_at = now_ms - 5000 + 1  # c2's call (_call), the pair's second short call
        window = flagged_at - flagged_at % 3_600_000
        assert [(e["ty"], e["tn"], e["src"]) for e in entries] == [
            ("cdr.created", bucket.tenant_id, "c|c1"),
            ("cdr.created", bucket.tenant_id, "c|c2"),
            ("abuse.flagged", bucket.tenant_id, f"{X}|13711112222"),
        ]
        assert entries[2]["d"] == f"{window}|2|0|2"
        redis_sync.delete(event_keys.outbox_key_beside(bucket.stream))
