"""EventLog.watch on a real Redis (standalone or cluster): a watch resumed after the last cursor it received goes on
with no gap and no repeat, however often it reconnects; "" starts from now, "0" from the oldest kept; types filter;
the watcher limits answer RESOURCE_EXHAUSTED naming their setting; a bad cursor INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest

from numprotect.core.clock import SystemClock
from numprotect.core.errors import InvalidArgument, ResourceExhausted
from numprotect.core.redis_client import RedisClient
from numprotect.events.v1 import events_pb2
from numprotect.services.events.log import EventLog
from numprotect.services.events.router import Router
from support.event_routing import add_entry, events_settings, log_entries, number_entry, router_parts

TENANT = "t1"
X = "70010000000"
_BASE_MS = 1_790_000_000_000


async def log_events(
    redis_sync: Any, router: Router, count: int, *, first: int = 0, kind: str = "number.locked"
) -> None:
    """`count` events in the tenant's log (routed from outbox entries of several slots)."""
    for i in range(first, first + count):
        add_entry(redis_sync, (i * 37) % 16384, number_entry(TENANT, X, _BASE_MS + i, kind))
    assert await router.poll() == count


async def take(watch: AsyncIterator[tuple[events_pb2.Event, str]], count: int) -> list[tuple[events_pb2.Event, str]]:
    """The next `count` events of a watch (within 5 s), then the watch closed."""
    got: list[tuple[events_pb2.Event, str]] = []
    try:
        async with asyncio.timeout(5):
            async for item in watch:
                got.append(item)
                if len(got) == count:
                    break
    finally:
        await watch.aclose()  # type: ignore[attr-defined]
    return got


@asynccontextmanager
async def event_log(redis: RedisClient, **settings: str) -> AsyncIterator[EventLog]:
    log = EventLog(redis, events_settings(**settings), SystemClock())
    try:
        yield log
    finally:
        await log.close()


def ids(items: Sequence[tuple[events_pb2.Event, str]]) -> list[str]:
    return [event.event_id for event, _ in items]


async def test_a_watch_resumed_after_its_last_cursor_misses_nothing_and_repeats_nothing(
    redis_env: dict[str, str], redis_sync: Any
) -> None:
    async with router_parts(redis_env) as (redis, _, router, _), event_log(redis) as log:
        await log_events(redis_sync, router, 5)
        got = await take(log.watch(TENANT, (), "0"), 2)
        # Reconnect after every event or two; more events are logged while the watch blocks.
        cursor = got[-1][1]
        while len(got) < 5:
            batch = await take(log.watch(TENANT, (), cursor), 1)
            got += batch
            cursor = batch[-1][1]
        waiting = asyncio.create_task(take(log.watch(TENANT, (), cursor), 4))
        await asyncio.sleep(0.3)  # the watch is blocked in its read
        await log_events(redis_sync, router, 4, first=5)
        got += await waiting

        logged = log_entries(redis_sync, TENANT)
        assert ids(got) == [fields["id"] for _, fields in logged]
        assert [c for _, c in got] == [entry_id for entry_id, _ in logged]
        first, _ = got[0]
        assert first.type == "number.locked"
        assert first.time.ToMilliseconds() == _BASE_MS
        assert first.payload_json == logged[0][1]["p"]


async def test_a_watch_from_now_sees_only_later_events_and_the_types_it_asks_for(
    redis_env: dict[str, str], redis_sync: Any
) -> None:
    async with router_parts(redis_env) as (redis, _, router, _), event_log(redis) as log:
        await log_events(redis_sync, router, 3)
        from_now = asyncio.create_task(take(log.watch(TENANT, (), ""), 2))
        unlocks = asyncio.create_task(take(log.watch(TENANT, ["number.unlocked"], "0"), 1))
        await asyncio.sleep(0.3)
        await log_events(redis_sync, router, 1, first=3)
        await log_events(redis_sync, router, 1, first=4, kind="number.unlocked")
        logged = [fields["id"] for _, fields in log_entries(redis_sync, TENANT)]
        assert ids(await from_now) == logged[3:]
        [(unlocked, _)] = await unlocks
        assert unlocked.type == "number.unlocked" and unlocked.event_id == logged[4]


async def test_watcher_limits_answer_resource_exhausted_naming_the_setting(
    redis_env: dict[str, str], redis_sync: Any
) -> None:
    limits = {"NUMPROTECT_EVENTS_MAX_WATCHERS": "2", "NUMPROTECT_EVENTS_MAX_WATCHERS_PER_TENANT": "1"}
    async with router_parts(redis_env) as (redis, _, _, _), event_log(redis, **limits) as log:
        first = asyncio.create_task(take(log.watch(TENANT, (), ""), 1))
        other = asyncio.create_task(take(log.watch("t2", (), ""), 1))
        await _until(lambda: log.watchers.open == 2)  # both watches started (not a fixed 0.2 s: a loaded host)
        assert (log.watchers.open, log.watchers.held(TENANT)) == (2, 1)
        with pytest.raises(ResourceExhausted) as per_tenant:
            await take(log.watch(TENANT, (), ""), 1)
        assert per_tenant.value.subject == "NUMPROTECT_EVENTS_MAX_WATCHERS_PER_TENANT"
        with pytest.raises(ResourceExhausted) as total:
            await take(log.watch("t3", (), ""), 1)
        assert total.value.subject == "NUMPROTECT_EVENTS_MAX_WATCHERS"
        first.cancel()
        other.cancel()
        await asyncio.gather(first, other, return_exceptions=True)
        assert log.watchers.open == 0  # the places are given back when the watches end
        again = asyncio.create_task(take(log.watch(TENANT, (), ""), 1))
        await _until(lambda: log.watchers.held(TENANT) == 1)
        await log.close()  # shutdown: the watch ends at its next read (bounded by the block time)
        assert await asyncio.wait_for(again, 2) == []


async def _until(condition: Callable[[], bool]) -> None:
    """Until `condition()` holds (a count the event log keeps: no event to wait on); fails the test after 10 s."""
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    "cursor", ["x", "1-", "-1-0", "12", "99999999999999999999999-0", "0-0 ", "99999999999999-0", "4102444800000-0"]
)
async def test_a_cursor_of_no_form_a_watch_gives_is_invalid(redis_env: dict[str, str], cursor: str) -> None:
    async with router_parts(redis_env) as (redis, _, _, _), event_log(redis) as log:
        with pytest.raises(InvalidArgument) as refused:
            await take(log.watch(TENANT, (), cursor), 1)
        assert [v.field for v in refused.value.violations] == ["cursor"]
        assert log.watchers.open == 0
