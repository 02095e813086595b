"""CDR storage on Redis: exactly-once ingest (ingest.lua), paged listing (list_page.lua), watch reads,
daily counters and abuse signals. Key layout in numprotect.core.cdr_keys and docs/redis-schema.md (CDR)."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from numprotect.cdr.v1 import cdr_pb2
from numprotect.core.cdr_keys import Bucket
from numprotect.core.conversions import timestamp_from_ms
from numprotect.core.limits import ConcurrencyLimit
from numprotect.core.redis_client import LuaScript, RedisClient
from numprotect.core.replica_wait import ReplicaWait
from numprotect.services.cdr.settings import CdrSettings
from numprotect.services.cdr.validation import ValidCdr

BEIJING = dt.timezone(dt.timedelta(hours=8), "UTC+8")
# Records per script call: bounds how long one script holds Redis (translation shares it).
SCRIPT_CHUNK = 128
_KEYS_PER_RECORD = 6
# How long ingest.lua keeps a call's reply for a repeat of that call (a cluster client re-sends a script whose reply
# it lost, within the call's deadline): far longer than any such retry, short enough to cost little memory.
ANSWER_KEEP_MS = 60_000
_FLAG_BINDING, _FLAG_ORDER, _FLAG_ABUSE, _FLAG_ANSWERED, _FLAG_SHORT, _FLAG_UNANSWERED = 1, 2, 4, 8, 16, 32


def answer_key(bucket: Bucket) -> str:
    """A new key under which one call of ingest.lua keeps its reply (for a repeat of that very call)."""
    return f"{bucket.prefix}ing:{secrets.token_hex(8)}"


def beijing_date(ms: int) -> str:
    """YYYYMMDD of the moment `ms` in Beijing time."""
    return dt.datetime.fromtimestamp(ms / 1000, BEIJING).strftime("%Y%m%d")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def decode_entry(entry_id: bytes | str, payload: bytes) -> cdr_pb2.CallDetailRecord:
    """A stored record, with ingest_time taken from its stream id (the moment Redis appended it)."""
    record = cdr_pb2.CallDetailRecord()
    record.ParseFromString(payload)
    record.ingest_time.CopyFrom(timestamp_from_ms(int(_text(entry_id).split("-", 1)[0])))
    return record


@dataclass(frozen=True, slots=True)
class Page:
    records: list[tuple[str, cdr_pb2.CallDetailRecord]]
    more: bool
    last_score: str
    last_member: str


@dataclass(frozen=True, slots=True)
class DailyStats:
    calls: int
    answered: int
    billable_seconds: int


@dataclass(frozen=True, slots=True)
class AbuseCounters:
    virtual_number: str
    calling_number: str
    window_start_ms: int
    total: int
    short: int
    unanswered: int
    flagged: bool


class CdrStore:
    """Every operation holds one place of the process's Redis limit (it sends one command at a time); the
    watch reads run on the watchers' own client and are bounded by WatchCdrs instead."""

    _ingest = LuaScript.beside(__file__, "ingest.lua")
    _list_page = LuaScript.beside(__file__, "list_page.lua")

    def __init__(
        self,
        redis: RedisClient,
        settings: CdrSettings,
        redis_limit: ConcurrencyLimit,
        replicas: ReplicaWait | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.redis_limit = redis_limit
        # NUMPROTECT_REDIS_WAIT_REPLICAS: an ingest is acknowledged once replicas have it (off when None or 0).
        self.replicas = replicas

    def window_start(self, ms: int) -> int:
        return ms - ms % self.settings.abuse_window_ms

    async def ingest(self, tenant_id: str, records: Sequence[ValidCdr], now_ms: int) -> list[str | None]:
        """Stores records of one bucket; per record the new stream id, or None for a duplicate call_id.

        With NUMPROTECT_REDIS_WAIT_REPLICAS set, returns once that many replicas have the records, else raises
        Unavailable (nothing of the call is acknowledged; a retry is deduplicated by call_id and waits again, also
        when every record turns out to be a duplicate)."""
        results: list[str | None] = []
        bucket = Bucket(tenant_id)
        async with self.redis_limit:
            for start in range(0, len(records), SCRIPT_CHUNK):
                chunk = records[start : start + SCRIPT_CHUNK]
                results.extend(await self._ingest_chunk(bucket, chunk, now_ms))
            if self.replicas is not None and records:
                await self.replicas.after([bucket.stream])  # every key of a bucket shares its hash tag
        return results

    async def _ingest_chunk(self, bucket: Bucket, records: Sequence[ValidCdr], now_ms: int) -> list[str | None]:
        settings = self.settings
        keys: list[str] = [bucket.stream, bucket.time_index]
        args: list[str | int | bytes] = [settings.retention_ms, settings.abuse_min_calls, len(records)]
        for valid in records:
            record = valid.record
            dedup = bucket.dedup(record.carrier_id, record.call_id)
            flags = 0
            if record.binding_id and record.binding_match != cdr_pb2.BINDING_MATCH_NONE:
                flags |= _FLAG_BINDING
            if record.out_order_id and record.binding_match != cdr_pb2.BINDING_MATCH_NONE:
                flags |= _FLAG_ORDER
            if valid.answered:
                flags |= _FLAG_ANSWERED
                if valid.billable_seconds * 1000 < settings.abuse_short_call_ms:
                    flags |= _FLAG_SHORT
            else:
                flags |= _FLAG_UNANSWERED
            window = self.window_start(valid.call_ms)
            # Counters are kept for the window and the next one (GetAbuseSignals reports both).
            abuse_until = window + 3 * settings.abuse_window_ms
            if abuse_until > now_ms:
                flags |= _FLAG_ABUSE
            keys += [
                dedup,
                bucket.daily(beijing_date(valid.call_ms)),
                bucket.binding_index(record.binding_id) if flags & _FLAG_BINDING else dedup,
                bucket.order_index(record.out_order_id) if flags & _FLAG_ORDER else dedup,
                bucket.abuse(window, record.called_number),
                bucket.abuse_flagged(window),
            ]
            args += [
                record.SerializeToString(deterministic=True),
                valid.call_ms,
                flags,
                valid.billable_seconds,
                record.calling_number,
                f"{record.called_number}|{record.calling_number}",
                abuse_until,
            ]
        keys.append(answer_key(bucket))
        args.append(ANSWER_KEEP_MS)
        reply = await self._ingest(self.redis, keys, args)
        return [None if item in (0, b"0") else _text(item) for item in reply]

    async def page(
        self,
        index_key: str,
        bucket: Bucket,
        *,
        min_score: str,
        max_score: str,
        after: tuple[str, str] | None,
        limit: int,
    ) -> Page:
        after_score, after_member = after if after is not None else ("", "")
        async with self.redis_limit:
            reply: list[Any] = await self._list_page(
                self.redis,
                [index_key, bucket.stream],
                [min_score, max_score, after_score, after_member, limit, max(limit * 10, 100)],
            )
        more, last_score, last_member = int(reply[0]), _text(reply[1]), _text(reply[2])
        items = reply[3:]
        records = [(_text(items[i]), decode_entry(items[i], items[i + 1])) for i in range(0, len(items), 2)]
        return Page(records, bool(more), last_score, last_member)

    async def last_id(self, bucket: Bucket) -> str:
        """The id of the newest record in the bucket's stream, or "0-0" when it is empty."""
        async with self.redis_limit:
            newest: Any = await self.redis.xrevrange(bucket.stream, "+", "-", count=1)
        return _text(newest[0][0]) if newest else "0-0"

    async def read_after(
        self, client: RedisClient, bucket: Bucket, cursor: str, *, count: int, block_ms: int
    ) -> list[tuple[str, cdr_pb2.CallDetailRecord]]:
        """Records strictly after `cursor`, waiting up to block_ms for the first one."""
        reply: Any = await client.xread({bucket.stream: cursor}, count=count, block=block_ms)
        out: list[tuple[str, cdr_pb2.CallDetailRecord]] = []
        if not reply:
            return out
        # [[stream, [(id, {field: value}), ...]]]
        for _name, entries in reply:
            for entry_id, fields in entries:
                payload = fields.get(b"p")
                if payload is not None:
                    out.append((_text(entry_id), decode_entry(entry_id, payload)))
        return out

    async def daily(self, bucket: Bucket, yyyymmdd: str) -> DailyStats:
        async with self.redis_limit:
            calls, answered, billable = await self.redis.hmget(
                bucket.daily(yyyymmdd), ["calls", "answered", "billable"]
            )
        return DailyStats(int(calls or 0), int(answered or 0), int(billable or 0))

    async def abuse(self, bucket: Bucket, now_ms: int, virtual_number: str, *, limit: int) -> list[AbuseCounters]:
        """Counters of the current and the previous window: every caller of one number, or flagged pairs; at most
        `limit` (number, caller) pairs per window (NUMPROTECT_CDR_MAX_ABUSE_SIGNALS): the flagged pairs with the
        most short or unanswered calls, or the first callers of the number's hash that a scan meets."""
        async with self.redis_limit:
            return await self._abuse(bucket, now_ms, virtual_number, limit)

    async def _abuse(self, bucket: Bucket, now_ms: int, virtual_number: str, limit: int) -> list[AbuseCounters]:
        current = self.window_start(now_ms)
        windows = [current, current - self.settings.abuse_window_ms]
        out: list[AbuseCounters] = []
        for window in windows:
            if virtual_number:
                key = bucket.abuse(window, virtual_number)
                callers = await self._callers_of(key, limit)
                out += await self._read_counters(key, window, virtual_number, callers)
                continue
            members: Any = await self.redis.zrange(bucket.abuse_flagged(window), 0, limit - 1, desc=True)
            by_number: dict[str, list[str]] = {}
            for member in members:
                number, _, caller = _text(member).partition("|")
                by_number.setdefault(number, []).append(caller)
            for number, callers in sorted(by_number.items()):
                out += await self._read_counters(bucket.abuse(window, number), window, number, callers)
        return out

    async def _callers_of(self, key: str, limit: int) -> list[str]:
        """At most `limit` callers in a number's counter hash (three fields each), without reading a huge one whole."""
        found: set[str] = set()
        if int(await self.redis.hlen(key)) <= 3 * limit:
            names: Any = await self.redis.hkeys(key)
            found.update(_text(name).rsplit(":", 1)[0] for name in names)
            return sorted(found)[:limit]
        cursor: Any = 0
        while len(found) < limit:
            cursor, batch = await self.redis.hscan(key, cursor, count=3 * limit)  # NOVALUES needs Redis 7.4
            found.update(_text(name).rsplit(":", 1)[0] for name in batch)
            if int(cursor) == 0:
                break
        return sorted(found)[:limit]

    async def _read_counters(self, key: str, window: int, number: str, callers: list[str]) -> list[AbuseCounters]:
        names = [f"{caller}:{suffix}" for caller in callers for suffix in ("t", "s", "u")]
        if not names:
            return []
        values: Any = await self.redis.hmget(key, names)
        counts = {name: int(value) for name, value in zip(names, values, strict=True) if value is not None}
        return self._counters(window, number, counts)

    def _counters(self, window: int, number: str, fields: dict[str, int]) -> list[AbuseCounters]:
        callers = sorted({name.rsplit(":", 1)[0] for name in fields})
        out = []
        for caller in callers:
            short = fields.get(f"{caller}:s", 0)
            unanswered = fields.get(f"{caller}:u", 0)
            out.append(
                AbuseCounters(
                    virtual_number=number,
                    calling_number=caller,
                    window_start_ms=window,
                    total=fields.get(f"{caller}:t", 0),
                    short=short,
                    unanswered=unanswered,
                    flagged=short + unanswered >= self.settings.abuse_min_calls,
                )
            )
        return out
