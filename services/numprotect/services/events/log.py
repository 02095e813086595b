"""A tenant's event log (event_keys.TenantKeys.log): WatchEvents reads it, ReplayEvents queues its entries again,
and the dispatcher reads the events it delivers from it.

The log is a stream: one entry per event (fields id, ty, at, p: the event id, its type, its ms and its single-event
webhook body), appended by route.lua when the event is routed, trimmed by MINID to the retention. A log entry id is
a watch's cursor: a watch resumed after the last cursor it received reads on from the next entry, so nothing is
skipped and nothing repeated however often it reconnects ("0": from the oldest entry kept; "": from now).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from numprotect.core.clock import Clock
from numprotect.core.conversions import timestamp_from_ms
from numprotect.core.errors import InvalidArgument, ResourceExhausted
from numprotect.core.event_keys import TenantKeys
from numprotect.core.redis_batch import Command, raise_first, send_together
from numprotect.core.redis_client import LuaScript, RedisClient, as_text
from numprotect.events.v1 import events_pb2
from numprotect.services.events.endpoints import StoredEndpoint
from numprotect.services.events.settings import EventsSettings

MAX_WATCHERS_SETTING = "NUMPROTECT_EVENTS_MAX_WATCHERS"
MAX_WATCHERS_PER_TENANT_SETTING = "NUMPROTECT_EVENTS_MAX_WATCHERS_PER_TENANT"
MAX_REPLAY_EVENTS_SETTING = "NUMPROTECT_EVENTS_MAX_REPLAY_EVENTS"
CURSOR_RULE = 'must be "", "0" or a cursor a previous WatchEvents response carried'
# Entries per blocking read of a watch, and per replay_scan.lua call of a replay.
WATCH_COUNT = 100
REPLAY_PAGE = 1000
# Log entry ids per enqueue.lua call.
ENQUEUE_CHUNK = 500
_ENTRY_ID = re.compile(r"(\d{1,20})-(\d{1,20})", re.ASCII)
_START = "0-0"
# How far past this process's clock a cursor may be (Redis's clock may run ahead of it).
FUTURE_CURSOR_SLACK_MS = 60_000
# How much before a replay's start the log is read: an entry's id is the routing time by the Redis node of the
# tenant's slot, its event time comes from another clock (the binding service's host, the Redis node of a CDR
# bucket or a sub-pool) that may run a little ahead, so an event at the range's start may be logged just before it.
REPLAY_CLOCK_SLACK_MS = 60_000

_enqueue = LuaScript.beside(__file__, "enqueue.lua")
_replay_scan = LuaScript.beside(__file__, "replay_scan.lua")


def check_cursor(cursor: str) -> None:
    """INVALID_ARGUMENT (field cursor) for a cursor of no form a watch issues."""
    if cursor in ("", "0"):
        return
    match = _ENTRY_ID.fullmatch(cursor)
    if match is None or any(int(part) >= 2**64 for part in match.groups()):
        raise InvalidArgument.field("cursor", CURSOR_RULE)


def enqueue_command(tenant_id: str, endpoint_id: str, log_ids: Sequence[str]) -> Command:
    """Queues log entries for one endpoint, due now (what route.lua does for a new event; ReplayEvents and
    RedriveDeadLetters send this): ZADD queue NX, attempts 0, ZADD ready LT; nothing for an endpoint deleted."""
    keys = TenantKeys(tenant_id)
    return Command.run(
        _enqueue,
        [keys.queue(endpoint_id), keys.attempts(endpoint_id), keys.ready, keys.endpoints],
        [endpoint_id, *log_ids],
    )


def event_of(fields: Mapping[Any, Any]) -> events_pb2.Event:
    """The Event of a log entry's fields."""
    values = {as_text(k): as_text(v) for k, v in fields.items()}
    return events_pb2.Event(
        event_id=values.get("id", ""),
        type=values.get("ty", ""),
        time=timestamp_from_ms(int(values.get("at", "0") or 0)),
        payload_json=values.get("p", ""),
    )


class Watchers:
    """Open watches per process and per tenant (one event loop: no lock); a place is given back when its watch
    ends, however it ends (closed, cancelled, failed)."""

    def __init__(self, total: int, per_tenant: int) -> None:
        self.total = total
        self.per_tenant = per_tenant
        self._held: dict[str, int] = {}
        self._count = 0

    @property
    def open(self) -> int:
        return self._count

    def held(self, tenant_id: str) -> int:
        return self._held.get(tenant_id, 0)

    @contextmanager
    def hold(self, tenant_id: str) -> Iterator[None]:
        held = self._held.get(tenant_id, 0)
        if held >= self.per_tenant:
            raise ResourceExhausted(
                f"{MAX_WATCHERS_PER_TENANT_SETTING} ({self.per_tenant}) WatchEvents streams of this tenant are "
                "open on this server already; close one before opening another",
                subject=MAX_WATCHERS_PER_TENANT_SETTING,
            )
        if self._count >= self.total:
            raise ResourceExhausted(
                f"{MAX_WATCHERS_SETTING} ({self.total}) WatchEvents streams are open on this server already; "
                "retry later or on another replica",
                subject=MAX_WATCHERS_SETTING,
            )
        self._held[tenant_id] = held + 1
        self._count += 1
        try:
            yield
        finally:
            self._count -= 1
            left = self._held[tenant_id] - 1
            if left:
                self._held[tenant_id] = left
            else:
                del self._held[tenant_id]


class EventLog:
    """`watch_redis`: the client watches block on (XREAD BLOCK up to settings.watch_block_s holds a connection: its
    own pool, sized to max_watchers, with a timeout above the block time; default: `redis`)."""

    def __init__(
        self,
        redis: RedisClient,
        settings: EventsSettings,
        clock: Clock,
        *,
        watch_redis: RedisClient | None = None,
    ) -> None:
        self.redis = redis
        self.watch_redis = watch_redis if watch_redis is not None else redis
        self.settings = settings
        self.clock = clock
        self.watchers = Watchers(settings.max_watchers, settings.max_watchers_per_tenant)
        self._closing = asyncio.Event()

    async def close(self) -> None:
        """Ends the watches at their next read (shutdown, before the watch connections close)."""
        self._closing.set()

    async def watch(
        self, tenant_id: str, event_types: Collection[str], cursor: str
    ) -> AsyncIterator[tuple[events_pb2.Event, str]]:
        """The tenant's events after `cursor` (of `event_types`; empty: all), each with its cursor, until closed.
        RESOURCE_EXHAUSTED (naming the setting) when the process or the tenant has its most watches open."""
        check_cursor(cursor)
        wanted = frozenset(event_types)
        log_key = TenantKeys(tenant_id).log
        block_ms = max(1, int(self.settings.watch_block_s * 1000))
        with self.watchers.hold(tenant_id):
            if cursor not in ("", "0"):
                self._check_not_future(cursor)
            after = _START if cursor == "0" else cursor or await self._last_id(log_key)
            while not self._closing.is_set():
                reply: Any = await self.watch_redis.xread({log_key: after}, count=WATCH_COUNT, block=block_ms)
                for _, entries in reply or ():
                    for raw_id, fields in entries:
                        after = as_text(raw_id)
                        event = event_of(fields)
                        if not wanted or event.type in wanted:
                            yield event, after

    def _check_not_future(self, cursor: str) -> None:
        # Log entry ids are Redis TIME milliseconds: a cursor past now (beyond any clock skew) was issued by no watch,
        # and resuming from it would skip, silently, every event until that time.
        if int(cursor.split("-", 1)[0]) > self.clock.now_ms() + FUTURE_CURSOR_SLACK_MS:
            raise InvalidArgument.field("cursor", CURSOR_RULE + " (this one is later than now)")

    async def _last_id(self, log_key: str) -> str:
        newest: Any = await self.redis.xrevrange(log_key, "+", "-", count=1)
        return as_text(newest[0][0]) if newest else _START

    async def replay(self, stored: StoredEndpoint, start_ms: int, end_ms: int) -> int:
        """Queues for `stored` the logged events with time in [start_ms, end_ms) of types it subscribes to (the same
        log entries: the same event ids); returns how many. All or nothing: a range holding more than
        settings.max_replay_events of them is RESOURCE_EXHAUSTED (naming the setting) with nothing queued, found
        out as soon as the read passes the limit. The log is read in chunks of REPLAY_PAGE entries, ids only
        (replay_scan.lua), from REPLAY_CLOCK_SLACK_MS before start_ms on: an entry is logged when routed, after
        its event (by clocks that may differ a little)."""
        log_key = TenantKeys(stored.tenant_id).log
        limit = self.settings.max_replay_events
        types = list(stored.endpoint.event_types)
        chosen: list[str] = []
        start = f"{max(0, start_ms - REPLAY_CLOCK_SLACK_MS)}-0"
        while start:
            reply: Any = await _replay_scan(self.redis, [log_key], [start, start_ms, end_ms, REPLAY_PAGE, *types])
            last, *ids = (as_text(item) for item in reply)
            chosen.extend(ids)
            if len(chosen) > limit:
                raise ResourceExhausted(
                    f"the range holds more than {MAX_REPLAY_EVENTS_SETTING} ({limit}) events for this endpoint; "
                    "nothing was queued: replay it in shorter ranges",
                    subject=MAX_REPLAY_EVENTS_SETTING,
                )
            start = f"({last}" if last else ""
        return await self._enqueue(stored.tenant_id, stored.endpoint_id, chosen)

    async def _enqueue(self, tenant_id: str, endpoint_id: str, log_ids: Sequence[str]) -> int:
        commands = [
            enqueue_command(tenant_id, endpoint_id, log_ids[start : start + ENQUEUE_CHUNK])
            for start in range(0, len(log_ids), ENQUEUE_CHUNK)
        ]
        if not commands:
            return 0
        return sum(int(reply) for reply in raise_first(await send_together(self.redis, commands)))

    async def read(self, tenant_id: str, log_ids: Sequence[str]) -> dict[str, events_pb2.Event]:
        """The events of log entries still kept, by log entry id (trimmed ones are absent)."""
        ids = list(dict.fromkeys(log_ids))
        if not ids:
            return {}
        log_key = TenantKeys(tenant_id).log
        async with self.redis.pipeline(transaction=False) as pipe:
            for log_id in ids:
                pipe.xrange(log_key, log_id, log_id, count=1)
            replies = await pipe.execute()
        found: dict[str, events_pb2.Event] = {}
        for log_id, entries in zip(ids, replies, strict=True):
            if entries:
                found[log_id] = event_of(entries[0][1])
        return found
