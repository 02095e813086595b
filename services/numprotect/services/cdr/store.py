"""CDR storage on Redis: exactly-once ingest (ingest.lua), paged listing (list_page.lua, or list_index.lua and
read_entries.lua over several buckets), watch reads, daily counters and abuse signals. An owner's records are in
its buckets (bucket_count.lua fixes how many on its first write). Key layout in numprotect.core.cdr_keys and
docs/redis-schema.md (CDR)."""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from numprotect.cdr.v1 import cdr_pb2
from numprotect.core import event_keys, event_outbox
from numprotect.core.cdr_keys import Bucket, Buckets, count_key
from numprotect.core.conversions import timestamp_from_ms
from numprotect.core.limits import ConcurrencyLimit
from numprotect.core.redis_batch import Command
from numprotect.core.redis_client import LuaScript, RedisClient
from numprotect.core.replica_wait import ReplicaWait
from numprotect.services.cdr.counts import CdrCounts
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
# Owners whose bucket count a process remembers (a count never changes once stored; least recently used first out).
BUCKET_COUNTS_KEPT = 10_000
_T = TypeVar("_T")


def answer_key(bucket: Bucket) -> str:
    """A new key under which one call of ingest.lua keeps its reply (for a repeat of that very call)."""
    return f"{bucket.prefix}ing:{secrets.token_hex(8)}"


def beijing_date(ms: int) -> str:
    """YYYYMMDD of the moment `ms` in Beijing time."""
    return dt.datetime.fromtimestamp(ms / 1000, BEIJING).strftime("%Y%m%d")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entry_order(entry: tuple[str, str, int]) -> tuple[float, bytes, int]:
    """(call time, stream id as Redis orders members: bytewise, bucket) of a listed index entry."""
    score, member, bucket = entry
    return float(score), member.encode(), bucket


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
    last_bucket: int = 0


@dataclass(frozen=True, slots=True)
class Position:
    """Where a listing over buckets stands: the last index entry it passed (call time ms, stream id, bucket).
    Entries are listed in (score, member, bucket) order: call time, then stream id, then bucket."""

    score: str
    member: str
    bucket: int

    def includes_equal(self, bucket: int) -> bool:
        """Whether an entry of `bucket` with this very score and member comes after the position."""
        return bucket > self.bucket


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
    _list_index = LuaScript.beside(__file__, "list_index.lua")
    _read_entries = LuaScript.beside(__file__, "read_entries.lua")
    _bucket_count = LuaScript.beside(__file__, "bucket_count.lua")

    def __init__(
        self,
        redis: RedisClient,
        settings: CdrSettings,
        redis_limit: ConcurrencyLimit,
        replicas: ReplicaWait | None = None,
        *,
        counts: CdrCounts | None = None,
    ) -> None:
        self.redis = redis
        event_outbox.warm()
        # numprotect_abuse_flags: ingest.lua says how many pairs each call flagged.
        self.abuse_flagged = (counts or CdrCounts.uncounted()).abuse_flagged
        self.settings = settings
        self.redis_limit = redis_limit
        # NUMPROTECT_REDIS_WAIT_REPLICAS: an ingest is acknowledged once replicas have it (off when None or 0).
        self.replicas = replicas
        self._counts: OrderedDict[str, Buckets] = OrderedDict()  # owner -> its buckets, once its count is stored

    def window_start(self, ms: int) -> int:
        return ms - ms % self.settings.abuse_window_ms

    async def _held(self, call: Awaitable[_T]) -> _T:
        """`call` while holding a place of the Redis limit (one per concurrent branch, never nested)."""
        async with self.redis_limit:
            return await call

    # --- buckets ----------------------------------------------------------------------------------

    def _remember(self, tenant_id: str, count: int) -> Buckets:
        buckets = Buckets.of(tenant_id, count)
        self._counts[tenant_id] = buckets
        if len(self._counts) > BUCKET_COUNTS_KEPT:
            self._counts.popitem(last=False)
        return buckets

    def _known(self, tenant_id: str) -> Buckets | None:
        buckets = self._counts.get(tenant_id)
        if buckets is not None:
            self._counts.move_to_end(tenant_id)
        return buckets

    async def buckets(self, tenant_id: str) -> Buckets:
        """The buckets to read an owner's records from. An owner with no stored count has written nothing since
        buckets exist: whatever it has is in bucket 0."""
        return await self.stored_buckets(tenant_id) or Buckets.of(tenant_id, 1)

    async def stored_buckets(self, tenant_id: str) -> Buckets | None:
        """The owner's buckets when its count is stored, else None (asked again on every call: its first write
        may come at any moment)."""
        known = self._known(tenant_id)
        if known is not None:
            return known
        async with self.redis_limit:
            stored: Any = await self.redis.get(count_key(tenant_id))
        return None if stored is None else self._remember(tenant_id, int(stored))

    async def buckets_for_writing(self, tenant_id: str) -> Buckets:
        """The buckets an owner's records go to; on the owner's first write (in this process) its count is read,
        or fixed: 1 for an owner with a stream from before buckets, NUMPROTECT_CDR_STREAM_BUCKETS for a new one."""
        known = self._known(tenant_id)
        if known is not None:
            return known
        first = Bucket(tenant_id)
        async with self.redis_limit:
            count = await self._bucket_count(
                self.redis, [count_key(tenant_id), first.stream], [self.settings.stream_buckets]
            )
        return self._remember(tenant_id, int(count))

    # --- ingestion --------------------------------------------------------------------------------

    async def ingest(self, tenant_id: str, records: Sequence[ValidCdr], now_ms: int) -> list[str | None]:
        """Stores records of one owner (tenant, or "" for unmatched); per record the new stream id, or None for a
        duplicate call_id. Each record goes to the bucket of its virtual number: one script call per bucket (per
        SCRIPT_CHUNK records), the buckets concurrently.

        With NUMPROTECT_REDIS_WAIT_REPLICAS set, returns once that many replicas have the records, else raises
        Unavailable (nothing of the call is acknowledged; a retry is deduplicated by call_id and waits again, also
        when every record turns out to be a duplicate)."""
        buckets = await self.buckets_for_writing(tenant_id)
        groups: dict[int, list[int]] = {}
        for position, valid in enumerate(records):
            bucket = buckets.for_number(valid.record.called_number)
            groups.setdefault(bucket.index, []).append(position)
        replies = await asyncio.gather(
            *(
                self._held(self._ingest_bucket(buckets.all[index], [records[p] for p in positions], now_ms))
                for index, positions in groups.items()
            )
        )
        results: list[str | None] = [None] * len(records)
        for positions, ids in zip(groups.values(), replies, strict=True):
            for position, entry_id in zip(positions, ids, strict=True):
                results[position] = entry_id
        if self.replicas is not None and records:
            # Every key of a bucket shares its hash tag: one marker per bucket written.
            await self._held(self.replicas.after([buckets.all[index].stream for index in groups]))
        return results

    async def _ingest_bucket(self, bucket: Bucket, records: Sequence[ValidCdr], now_ms: int) -> list[str | None]:
        results: list[str | None] = []
        for start in range(0, len(records), SCRIPT_CHUNK):
            results.extend(await self._ingest_chunk(bucket, records[start : start + SCRIPT_CHUNK], now_ms))
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
        if not bucket.tenant_id:  # records that matched no tenant: nobody to tell
            reply = await self._ingest(self.redis, keys, args)
        else:
            # cdr.created per record stored and abuse.flagged per pair flagged, in the outbox of the bucket's slot;
            # the slot's hint for the events service in the same round trip.
            keys.append(event_keys.outbox_key_beside(bucket.stream))
            args += [bucket.tenant_id, settings.abuse_window_ms]
            command = Command.run(self._ingest, keys, args)
            reply = await event_outbox.run_with_hints(self.redis, command, [event_outbox.ring_hint(bucket.stream)])
        count = len(records)
        # The last item: pairs this call flagged (absent in an answer kept by a version before it).
        if len(reply) > count and int(reply[count]):
            self.abuse_flagged.inc(int(reply[count]))
        return [None if item in (0, b"0") else _text(item) for item in reply[:count]]

    # --- listing ----------------------------------------------------------------------------------

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

    async def merged_page(
        self,
        index_of: Callable[[Bucket], str],
        buckets: Buckets,
        *,
        min_score: str,
        max_score: str,
        after: Position | None,
        limit: int,
    ) -> Page:
        """One page over every bucket's index (`index_of(bucket)`) in (call time, stream id, bucket) order: each
        bucket's first `limit` entries after the position (list_index.lua, buckets concurrently), merged; then the
        records of the `limit` first (read_entries.lua, one call per bucket that has some). Two round trips per
        bucket, index entries only for the ones not kept."""
        heads = await asyncio.gather(
            *(
                self._held(self._index_after(index_of(b), b.index, min_score, max_score, after, limit))
                for b in buckets.all
            )
        )
        more = any(bucket_more for bucket_more, _ in heads)
        entries = sorted((entry for _, bucket_entries in heads for entry in bucket_entries), key=_entry_order)
        if len(entries) > limit:
            more = True
            entries = entries[:limit]
        if not entries:
            return Page([], False, "", "")
        wanted: dict[int, list[str]] = {}
        for _score, member, index in entries:
            wanted.setdefault(index, []).append(member)
        found = await asyncio.gather(
            *(self._held(self._read_entries(self.redis, [buckets.all[i].stream], ids)) for i, ids in wanted.items())
        )
        payloads: dict[tuple[int, str], bytes] = {}
        for index, reply in zip(wanted, found, strict=True):
            for i in range(0, len(reply), 2):
                payloads[(index, _text(reply[i]))] = reply[i + 1]
        records = [
            (member, decode_entry(member, payloads[(index, member)]))
            for _score, member, index in entries
            if (index, member) in payloads
        ]
        last_score, last_member, last_bucket = entries[-1]
        return Page(records, more, last_score, last_member, last_bucket)

    async def _index_after(
        self, index_key: str, bucket: int, min_score: str, max_score: str, after: Position | None, limit: int
    ) -> tuple[bool, list[tuple[str, str, int]]]:
        cursor = (
            ("", "", "0")
            if after is None
            else (after.score, after.member, "1" if after.includes_equal(bucket) else "0")
        )
        reply: list[Any] = await self._list_index(self.redis, [index_key], [min_score, max_score, *cursor, limit])
        entries = [(_text(reply[i]), _text(reply[i + 1]), bucket) for i in range(1, len(reply), 2)]
        return bool(int(reply[0])), entries

    # --- watch --------------------------------------------------------------------------------------

    async def last_ids(self, buckets: Buckets) -> list[str]:
        """Per bucket, the id of the newest record in its stream, or "0-0" when it is empty."""
        newest: list[Any] = await asyncio.gather(
            *(self._held(self.redis.xrevrange(b.stream, "+", "-", count=1)) for b in buckets.all)
        )
        return [_text(entries[0][0]) if entries else "0-0" for entries in newest]

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

    # --- counters and signals --------------------------------------------------------------------

    async def daily(self, buckets: Buckets, yyyymmdd: str) -> DailyStats:
        """The owner's counters of one day: the sum over its buckets."""
        fields = ["calls", "answered", "billable"]
        replies: list[Any] = await asyncio.gather(
            *(self._held(self.redis.hmget(b.daily(yyyymmdd), fields)) for b in buckets.all)
        )
        calls, answered, billable = (sum(int(reply[i] or 0) for reply in replies) for i in range(3))
        return DailyStats(calls, answered, billable)

    async def abuse(self, buckets: Buckets, now_ms: int, virtual_number: str, *, limit: int) -> list[AbuseCounters]:
        """Counters of the current and the previous window: every caller of one number, or flagged pairs; at most
        `limit` (number, caller) pairs per window (NUMPROTECT_CDR_MAX_ABUSE_SIGNALS): the flagged pairs with the
        most short or unanswered calls, or the first callers of the number's hash that a scan meets. A number's
        counters are all in its bucket, so a pair is flagged on all of its calls."""
        current = self.window_start(now_ms)
        windows = [current, current - self.settings.abuse_window_ms]
        out: list[AbuseCounters] = []
        for window in windows:
            if virtual_number:
                key = buckets.for_number(virtual_number).abuse(window, virtual_number)
                async with self.redis_limit:
                    callers = await self._callers_of(key, limit)
                    out += await self._read_counters(key, window, virtual_number, callers)
                continue
            by_number: dict[str, list[str]] = {}
            for member in await self._most_flagged(buckets, window, limit):
                number, _, caller = member.partition("|")
                by_number.setdefault(number, []).append(caller)
            async with self.redis_limit:
                for number, callers in sorted(by_number.items()):
                    key = buckets.for_number(number).abuse(window, number)
                    out += await self._read_counters(key, window, number, callers)
        return out

    async def _most_flagged(self, buckets: Buckets, window: int, limit: int) -> list[str]:
        """The `limit` flagged pairs of a window with the most short or unanswered calls, over every bucket, in
        the order one ZSET would give them (score, then member, both descending)."""
        replies: list[Any] = await asyncio.gather(
            *(
                self._held(self.redis.zrange(b.abuse_flagged(window), 0, limit - 1, desc=True, withscores=True))
                for b in buckets.all
            )
        )
        flagged = [(float(score), _text(member)) for reply in replies for member, score in reply]
        flagged.sort(reverse=True)
        return [member for _score, member in flagged[:limit]]

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
