"""One test per Lua script of the cdr service, calling the script directly on a real Redis (either mode)."""

from __future__ import annotations

from typing import Any

from numprotect.core.cdr_keys import Bucket
from numprotect.core.redis_client import RedisClient
from numprotect.services.cdr.store import CdrStore

DAY = 86_400_000
X = "700100000000001"


def _args(payload: bytes, call_ms: int, flags: int, billable: int, caller: str, abuse_until: int) -> list[Any]:
    return [payload, call_ms, flags, billable, caller, f"{X}|{caller}", abuse_until]


async def test_ingest_script_stores_once_indexes_counts_flags_and_trims(
    redis: RedisClient, redis_sync: Any, now_ms: int
) -> None:
    bucket = Bucket("t-lua")
    window = now_ms - now_ms % 3_600_000
    # An entry older than the retention (id 1000-0) is trimmed by the next append (MINID).
    redis_sync.xadd(bucket.stream, {"p": b"ancient"}, id="1000-0")
    caller = "13711112222"

    def keys_of(call_id: str) -> list[str]:
        return [
            bucket.dedup("c", call_id),
            bucket.daily("20260301"),
            bucket.binding_index("b1"),
            bucket.order_index("o1"),
            bucket.abuse(window, X),
            bucket.abuse_flagged(window),
        ]

    keys = [bucket.stream, bucket.time_index, *keys_of("c1"), *keys_of("c2"), *keys_of("c1")]
    # c1: answered 2 s, short (flags 1|2|4|8|16); c2: unanswered (1|2|4|32); then c1 again in the same call.
    args: list[Any] = [180 * DAY, 2, 3]
    args += _args(b"one", now_ms - 5000, 1 | 2 | 4 | 8 | 16, 2, caller, window + 3 * 3_600_000)
    args += _args(b"two", now_ms - 4000, 1 | 2 | 4 | 32, 0, caller, window + 3 * 3_600_000)
    args += _args(b"one-again", now_ms - 5000, 1 | 2 | 4 | 8 | 16, 2, caller, window + 3 * 3_600_000)
    reply = await CdrStore._ingest(redis, keys, args)
    first, second, repeat, flagged = reply
    assert repeat == 0
    assert flagged == 1  # c2 brought the pair to 2 short or unanswered calls; counted once, not again by the repeat
    ids = [entry[0] for entry in redis_sync.xrange(bucket.stream)]
    assert ids == [first, second]  # the ancient entry is gone, the repeat was not appended
    assert [entry[1][b"p"] for entry in redis_sync.xrange(bucket.stream)] == [b"one", b"two"]
    assert redis_sync.get(bucket.dedup("c", "c1")) == first
    assert 0 < redis_sync.pttl(bucket.dedup("c", "c1")) <= 180 * DAY
    for index in (bucket.time_index, bucket.binding_index("b1"), bucket.order_index("o1")):
        assert redis_sync.zrange(index, 0, -1, withscores=True) == [(first, now_ms - 5000), (second, now_ms - 4000)]
        assert redis_sync.pttl(index) > 0
    assert redis_sync.hgetall(bucket.daily("20260301")) == {b"calls": b"2", b"answered": b"1", b"billable": b"2"}
    counters = redis_sync.hgetall(bucket.abuse(window, X))
    assert counters == {f"{caller}:t".encode(): b"2", f"{caller}:s".encode(): b"1", f"{caller}:u".encode(): b"1"}
    assert redis_sync.zrange(bucket.abuse_flagged(window), 0, -1, withscores=True) == [(f"{X}|{caller}".encode(), 2.0)]
    assert abs(redis_sync.pexpiretime(bucket.abuse(window, X)) - (window + 3 * 3_600_000)) <= 1


async def test_list_page_script_orders_by_score_then_id_skips_trimmed_and_resumes_after_the_cursor(
    redis: RedisClient, redis_sync: Any
) -> None:
    bucket = Bucket("t-page")
    ids = [redis_sync.xadd(bucket.stream, {"p": f"r{i}".encode()}).decode() for i in range(6)]
    scores = [100, 200, 200, 200, 300, 400]
    redis_sync.zadd(bucket.time_index, dict(zip(ids, scores, strict=True)))
    redis_sync.zadd(bucket.time_index, {"1-0": 250})  # an index entry whose record was trimmed
    redis_sync.xdel(bucket.stream, ids[5])  # and one more, at the end

    async def page(after: tuple[str, str] | None, limit: int, low: str = "-inf", high: str = "+inf") -> Any:
        reply = await CdrStore._list_page(
            redis, [bucket.time_index, bucket.stream], [low, high, *(after or ("", "")), limit, 100]
        )
        more, last_score, last_member = reply[0], reply[1], reply[2]
        payloads = [reply[i] for i in range(4, len(reply), 2)]
        return more, (last_score.decode(), last_member.decode()), payloads

    more, cursor, got = await page(None, 2)
    assert (more, got) == (1, [b"r0", b"r1"])
    more, cursor, got = await page(cursor, 2)  # resumes inside the tie at score 200
    assert (more, got) == (1, [b"r2", b"r3"])
    more, cursor, got = await page(cursor, 2)  # skips the trimmed 1-0 at 250 and the deleted last one
    assert (more, got) == (0, [b"r4"])
    more, _cursor, got = await page(None, 10, "200", "(300")
    assert (more, got) == (0, [b"r1", b"r2", b"r3"])
