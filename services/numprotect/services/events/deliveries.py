"""Delivery records of an endpoint: its attempts (ListDeliveries, newest first), its dead letters (ListDeadLetters,
oldest first) and their redrive (RedriveDeadLetters). Keys in numprotect.core.event_keys (the tenant's slot).

An attempt is one request (settle.lua appends it to the endpoint's attempts stream, trimmed by the retention): its
time, HTTP status, latency and error, and its events' ids, types and attempt numbers. Listed, it is one Delivery:
the first event's (or, when asked for one event's attempts, that event's) id, type and attempt number, the other
events of a batch in batched_event_ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf.duration_pb2 import Duration

from numprotect.core.clock import Clock
from numprotect.core.conversions import timestamp_from_ms
from numprotect.core.event_keys import TenantKeys
from numprotect.core.redis_client import LuaScript, RedisClient, as_text
from numprotect.events.v1 import events_pb2
from numprotect.services.events.settings import EventsSettings

# Attempts read per XREVRANGE while looking for one event's, and the most one call reads before it answers a short
# page (its token goes on from there).
SCAN_CHUNK = 500
MAX_SCANNED = 5000
# Dead letters put back per redrive.lua call (RedriveDeadLetters of all of an endpoint's).
REDRIVE_CHUNK = 500


class Deliveries:
    _redrive = LuaScript.beside(__file__, "redrive.lua")

    def __init__(self, redis: RedisClient, settings: EventsSettings, clock: Clock) -> None:
        self.redis = redis
        self.settings = settings
        self.clock = clock

    # --- attempts ---------------------------------------------------------------------------------

    async def attempts(
        self, tenant_id: str, endpoint_id: str, event_id: str, page_size: int, after: str
    ) -> tuple[list[events_pb2.Delivery], str]:
        """The endpoint's attempts (only `event_id`'s, if set), newest first, after the entry `after` (a stream id;
        "" from the newest); and the `after` of the next page ("" when this is the last)."""
        stream = TenantKeys(tenant_id).deliveries(endpoint_id)
        upper = f"({after}" if after else "+"
        if not event_id:
            entries: Any = await self.redis.xrevrange(stream, upper, "-", count=page_size + 1)  # type: ignore[misc]
            page = [_delivery(fields, 0) for _, fields in entries[:page_size]]
            following = as_text(entries[page_size - 1][0]) if len(entries) > page_size else ""
            return page, following
        found: list[events_pb2.Delivery] = []
        scanned = 0
        wanted = event_id.encode()
        while scanned < MAX_SCANNED:
            chunk: Any = await self.redis.xrevrange(stream, upper, "-", count=SCAN_CHUNK)  # type: ignore[misc]
            for entry_id, fields in chunk:
                scanned += 1
                ids = fields.get(b"ids", b"").split(b" ")
                if wanted in ids:
                    found.append(_delivery(fields, ids.index(wanted)))
                    if len(found) == page_size:
                        return found, as_text(entry_id)
                upper = f"({as_text(entry_id)}"
            if len(chunk) < SCAN_CHUNK:
                return found, ""
        return found, upper[1:]

    # --- dead letters -----------------------------------------------------------------------------

    async def dead_letters(
        self, tenant_id: str, endpoint_id: str, page_size: int, after: str
    ) -> tuple[list[events_pb2.DeadLetter], str]:
        """The endpoint's dead letters, oldest first, after `after` ("<dead ms>|<log id>"; "" from the oldest); and
        the `after` of the next page ("" when this is the last). Dead letters whose event has left the log (older
        than the retention) are not listed."""
        keys = TenantKeys(tenant_id)
        dead = keys.dead(endpoint_id)
        if after:
            score, _, last_id = after.partition("|")
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.execute_command("ZRANGE", dead, score, score, "BYSCORE", "WITHSCORES")
                pipe.execute_command(
                    "ZRANGE", dead, f"({score}", "+inf", "BYSCORE", "LIMIT", 0, page_size + 1, "WITHSCORES"
                )
                same, later = await pipe.execute()
            tied = [(m, s) for m, s in _scored(same) if m > last_id.encode()]
            candidates = tied + _scored(later)
        else:
            candidates = _scored(
                await self.redis.execute_command("ZRANGE", dead, 0, page_size, "WITHSCORES")  # type: ignore[no-untyped-call]
            )
        page, more = candidates[:page_size], len(candidates) > page_size
        if not page:
            return [], ""
        ids = [member for member, _ in page]
        async with self.redis.pipeline(transaction=False) as pipe:
            for log_id in ids:
                pipe.xrange(keys.log, log_id, log_id)
            pipe.hmget(keys.attempts(endpoint_id), ids)
            pipe.hmget(keys.dead_errors(endpoint_id), ids)
            replies = await pipe.execute()
        entries, attempts, errors = replies[: len(ids)], replies[-2], replies[-1]
        letters = []
        for (_, dead_ms), entry, attempt, error in zip(page, entries, attempts, errors, strict=True):
            if not entry:
                continue
            fields = entry[0][1]
            letters.append(
                events_pb2.DeadLetter(
                    event_id=as_text(fields.get(b"id", b"")),
                    event_type=as_text(fields.get(b"ty", b"")),
                    event_time=timestamp_from_ms(int(fields.get(b"at", b"0"))),
                    dead_time=timestamp_from_ms(int(dead_ms)),
                    attempts=int(attempt or 0),
                    last_error=as_text(error or b""),
                )
            )
        last_member, last_score = page[-1]
        return letters, f"{int(last_score)}|{as_text(last_member)}" if more else ""

    # --- redrive ----------------------------------------------------------------------------------

    async def redrive(self, tenant_id: str, endpoint_id: str, event_ids: Sequence[str]) -> int:
        """Puts the endpoint's dead letters of `event_ids` (all of them when empty) back on its queue, due now, their
        attempts reset; returns how many. An id that is no dead letter of the endpoint is left out."""
        keys = TenantKeys(tenant_id)
        script_keys = [
            keys.dead(endpoint_id),
            keys.dead_errors(endpoint_id),
            keys.queue(endpoint_id),
            keys.attempts(endpoint_id),
            keys.ready,
        ]
        if event_ids:
            async with self.redis.pipeline(transaction=False) as pipe:
                for event_id in event_ids:
                    pipe.get(keys.seen(event_id))
                log_ids = [as_text(log_id) for log_id in await pipe.execute() if log_id is not None]
            if not log_ids:
                return 0
            return int(await self._redrive(self.redis, script_keys, [endpoint_id, *log_ids]))
        requeued = 0
        while True:
            chunk = await self.redis.zrange(keys.dead(endpoint_id), 0, REDRIVE_CHUNK - 1)  # type: ignore[misc]
            if not chunk:
                return requeued
            done = int(await self._redrive(self.redis, script_keys, [endpoint_id, *chunk]))
            requeued += done
            if done == 0 or len(chunk) < REDRIVE_CHUNK:
                return requeued


def _scored(reply: Any) -> list[tuple[bytes, float]]:
    """A WITHSCORES reply (flat, or pairs as redis-py parses ZRANGE's) as (member, score) pairs."""
    if reply and isinstance(reply[0], (list, tuple)):
        return [(member, float(score)) for member, score in reply]
    return [(reply[i], float(reply[i + 1])) for i in range(0, len(reply), 2)]


def _delivery(fields: dict[bytes, bytes], index: int) -> events_pb2.Delivery:
    ids = [as_text(i) for i in fields.get(b"ids", b"").split(b" ")]
    types = as_text(fields.get(b"ty", b"")).split(" ")
    numbers = as_text(fields.get(b"n", b"")).split(" ")
    status = int(fields.get(b"s", b"0"))
    latency_us = int(fields.get(b"l", b"0"))
    error = as_text(fields.get(b"e", b""))
    return events_pb2.Delivery(
        event_id=ids[index],
        event_type=types[index] if index < len(types) else "",
        attempt=int(numbers[index]) if index < len(numbers) and numbers[index] else 0,
        attempt_time=timestamp_from_ms(int(fields.get(b"t", b"0"))),
        http_status=status,
        latency=Duration(seconds=latency_us // 1_000_000, nanos=(latency_us % 1_000_000) * 1000),
        error=error,
        succeeded=200 <= status < 300 and not error,
        batched_event_ids=[i for position, i in enumerate(ids) if position != index],
    )
