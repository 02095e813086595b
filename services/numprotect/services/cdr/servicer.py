"""The CdrService servicer: ingestion (batch and client stream), listing, live watch, counters, abuse signals.

Who may call what is the policy table's (numprotect.core.identity.policy): carriers ingest, tenants and the operator
read. Here: the carrier of a stored record is the caller's, and only for numbers it routes (`Reporter`); a read
acts for the caller's own tenant (a tenant key) or the one the operator names; the unmatched bucket (records no
binding matched) is the operator's only.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
from collections.abc import AsyncIterator
from typing import Any

import grpc

from numprotect.cdr.v1 import cdr_pb2, cdr_pb2_grpc
from numprotect.core.cdr_keys import MAX_BUCKETS, Bucket, Buckets
from numprotect.core.clock import Clock
from numprotect.core.conversions import optional_timestamp_ms, timestamp_from_ms
from numprotect.core.errors import InvalidArgument, ResourceExhausted
from numprotect.core.identifiers import OUT_ORDER_ID, TENANT_ID
from numprotect.core.identity.layer import Callers
from numprotect.core.identity.principal import Role
from numprotect.core.limits import ConcurrencyLimit
from numprotect.core.page_tokens import PageTokenKey, PageTokens
from numprotect.core.phone import InvalidNumber, mask, validate_virtual
from numprotect.core.redis_client import RedisClient
from numprotect.services.cdr.ingest import Ingestor, Reporter, Summary
from numprotect.services.cdr.settings import CdrSettings
from numprotect.services.cdr.store import BEIJING, CdrStore, Page, Position
from numprotect.services.cdr.validation import RECORD_ID
from numprotect.services.cdr.watch import Entries, MergedWatch, ReadAfter, check_cursor, decode_cursor, take_places
from numprotect.services.cdr.watch_slots import WatchSlots

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# StreamCdrs stores what it received every this many records (and at the end of the stream).
STREAM_CHUNK = 500
# WatchCdrs reads at most this many records per XREAD (per bucket).
WATCH_COUNT = 200
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
_BUCKET = re.compile(r"\d{1,2}", re.ASCII)

Context = grpc.aio.ServicerContext[Any, Any]


class CdrServiceServicer(cdr_pb2_grpc.CdrServiceServicer):
    def __init__(
        self,
        settings: CdrSettings,
        store: CdrStore,
        ingestor: Ingestor,
        watch_redis: RedisClient,
        *,
        callers: Callers,
        page_token_key: PageTokenKey,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.callers = callers
        self.store = store
        self.ingestor = ingestor
        self.clock = clock
        self.list_tokens = PageTokens(page_token_key, "cdr.ListCdrs")
        # Blocking XREADs hold a connection each: watchers get their own pool, bounded by max_watchers; a watch
        # takes a place per bucket it reads (one XREAD each), and one more than there are places is refused at once
        # (RESOURCE_EXHAUSTED), it does not wait for a place.
        self.watch_redis = watch_redis
        self._watchers = ConcurrencyLimit(
            settings.max_watchers,
            wait_seconds=0,
            name="WatchCdrs bucket reads (NUMPROTECT_CDR_MAX_WATCHERS)",
            exhausted=True,
        )
        self.watch_slots = WatchSlots(settings.max_watchers_per_tenant)
        self._closing = asyncio.Event()

    async def close(self) -> None:
        """Ends the watch loops at their next read (shutdown, before the watch connections close)."""
        self._closing.set()

    # --- whose records ------------------------------------------------------------------------------

    def _owner(self, tenant_id: str, unmatched: bool) -> str:
        """Whose records a read acts on: the caller's own tenant (a tenant key; another is PERMISSION_DENIED), the
        tenant the operator names, or the unmatched records ("", the operator's only)."""
        if unmatched:
            if tenant_id:
                raise InvalidArgument.field("tenant_id", "must be empty when unmatched is set")
            if self.callers.principal().role is Role.TENANT:
                raise self.callers.refuse(
                    "unmatched: records that matched no binding are the operator's to read", "OPERATOR_ONLY"
                )
            return ""
        try:
            tenant = self.callers.tenant(tenant_id)
        except InvalidArgument:
            raise InvalidArgument.field(
                "tenant_id", "is required (or set unmatched for records no binding matched)"
            ) from None
        return TENANT_ID.check("tenant_id", tenant)

    def _reporter(self) -> Reporter:
        """The carrier of the records this call reports (the caller's, never the request's)."""
        carrier_id = self.callers.principal().carrier_id if self.callers.enabled else None
        return Reporter(carrier_id, self.callers.carrier_routes)

    # --- ingestion ---------------------------------------------------------------------------------

    async def IngestCdrs(self, request: cdr_pb2.IngestCdrsRequest, context: Context) -> cdr_pb2.IngestCdrsResponse:  # noqa: N802
        if len(request.records) > self.settings.max_batch:
            raise InvalidArgument.field(
                "records",
                f"at most NUMPROTECT_CDR_MAX_BATCH ({self.settings.max_batch}) records per call "
                f"({len(request.records)} sent); split the batch or use StreamCdrs",
            )
        summary = await self.ingestor.ingest(request.records, self._reporter())
        return cdr_pb2.IngestCdrsResponse(
            accepted=summary.accepted,
            duplicates=summary.duplicates,
            rejected=[r.to_proto() for r in summary.rejected],
        )

    async def StreamCdrs(  # noqa: N802
        self, request_iterator: AsyncIterator[cdr_pb2.StreamCdrsRequest], context: Context
    ) -> cdr_pb2.StreamCdrsResponse:
        reporter = self._reporter()
        limit = self.settings.max_stream_records
        summary = Summary()
        pending: list[cdr_pb2.CallDetailRecord] = []
        received = 0
        async for message in request_iterator:
            if received + len(pending) >= limit:
                raise ResourceExhausted(
                    f"a StreamCdrs stream carries at most NUMPROTECT_CDR_MAX_STREAM_RECORDS ({limit}) records; the "
                    f"first {received} were stored (resend the rest on a new stream; a resent record is a duplicate)",
                    subject="NUMPROTECT_CDR_MAX_STREAM_RECORDS",
                )
            pending.append(message.record)
            if len(pending) >= STREAM_CHUNK:
                summary.add(await self._ingest_chunk(pending, reporter, received, summary))
                received += len(pending)
                pending = []
        if pending:
            summary.add(await self._ingest_chunk(pending, reporter, received, summary))
        return cdr_pb2.StreamCdrsResponse(
            accepted=summary.accepted,
            duplicates=summary.duplicates,
            rejected=[r.to_proto() for r in summary.rejected],
        )

    async def _ingest_chunk(
        self, records: list[cdr_pb2.CallDetailRecord], reporter: Reporter, received: int, summary: Summary
    ) -> Summary:
        return await self.ingestor.ingest(
            records, reporter, first_index=received, rejected_before=len(summary.rejected)
        )

    # --- listing -----------------------------------------------------------------------------------

    async def ListCdrs(self, request: cdr_pb2.ListCdrsRequest, context: Context) -> cdr_pb2.ListCdrsResponse:  # noqa: N802
        owner = self._owner(request.tenant_id, request.unmatched)
        if request.unmatched and (request.binding_id or request.out_order_id):
            field = "binding_id" if request.binding_id else "out_order_id"
            raise InvalidArgument.field(field, "unmatched records are indexed by call time only")
        # Both name a Redis key: bounded by the rules the stored values follow.
        RECORD_ID.check("binding_id", request.binding_id, required=False)
        OUT_ORDER_ID.check("out_order_id", request.out_order_id, required=False)
        if request.page_size < 0 or request.page_size > MAX_PAGE_SIZE:
            raise InvalidArgument.field("page_size", f"must be from 0 (default {DEFAULT_PAGE_SIZE}) to {MAX_PAGE_SIZE}")
        page_size = request.page_size or DEFAULT_PAGE_SIZE
        start_ms = optional_timestamp_ms(request, "start_time")
        end_ms = optional_timestamp_ms(request, "end_time")
        if start_ms is not None and end_ms is not None and end_ms <= start_ms:
            raise InvalidArgument.field("end_time", "must be after start_time")

        def index_of(bucket: Bucket) -> str:
            if request.binding_id:
                return bucket.binding_index(request.binding_id)
            if request.out_order_id:
                return bucket.order_index(request.out_order_id)
            return bucket.time_index

        # Everything that shapes the listing (not page_size): a token continues only the query that issued it.
        query = [
            owner,
            "1" if request.unmatched else "0",
            request.binding_id,
            request.out_order_id,
            "" if start_ms is None else str(start_ms),
            "" if end_ms is None else str(end_ms),
        ]
        after = self._list_position(request.page_token, query) if request.page_token else None
        buckets = await self.store.buckets(owner)
        min_score = str(start_ms) if start_ms is not None else "-inf"
        max_score = f"({end_ms}" if end_ms is not None else "+inf"
        page: Page
        if buckets.count == 1 and (after is None or after.bucket == 0):
            bucket = buckets.all[0]
            page = await self.store.page(
                index_of(bucket),
                bucket,
                min_score=min_score,
                max_score=max_score,
                after=None if after is None else (after.score, after.member),
                limit=page_size,
            )
        else:
            page = await self.store.merged_page(
                index_of, buckets, min_score=min_score, max_score=max_score, after=after, limit=page_size
            )
        records = [record for _id, record in page.records]
        if request.binding_id and request.out_order_id:
            records = [r for r in records if r.out_order_id == request.out_order_id]
        token = ""
        if page.more:
            # One bucket: the position (call time, stream id), as before buckets; several: and the bucket.
            position = [page.last_score, page.last_member]
            if buckets.count > 1:
                position.append(str(page.last_bucket))
            token = self.list_tokens.encode(position, query=query)
        return cdr_pb2.ListCdrsResponse(records=records, next_page_token=token)

    def _list_position(self, token: str, query: list[str]) -> Position:
        """The position a page token continues after: (call time, stream id) from a listing of one bucket, with the
        bucket from a listing of several."""
        try:
            score, member, bucket = self.list_tokens.decode(token, query=query, fields=3)
        except InvalidArgument:
            score, member = self.list_tokens.decode(token, query=query, fields=2)
            bucket = "0"
        if not _BUCKET.fullmatch(bucket) or int(bucket) >= MAX_BUCKETS:
            raise InvalidArgument.field("page_token", self.list_tokens.rule)
        return Position(score, member, int(bucket))

    # --- watch -------------------------------------------------------------------------------------

    async def WatchCdrs(  # noqa: N802
        self, request: cdr_pb2.WatchCdrsRequest, context: Context
    ) -> AsyncIterator[cdr_pb2.WatchCdrsResponse]:
        # The streams watched are the caller's own tenant's (or the one the operator names): a cursor only moves
        # within them, so "0" replays the caller's own records and nobody else's.
        owner = self._owner(request.tenant_id, request.unmatched)
        cursor = request.cursor
        check_cursor(cursor)
        principal = self.callers.principal()
        block_seconds = self.settings.watch_block_ms / 1000
        with self.watch_slots.hold(f"{principal.role.value}:{principal.id}"):
            # One generator, no nested one: closing it (cancel, revocation) gives the slot and places back at once.
            async with contextlib.AsyncExitStack() as places:
                stored = await self.store.stored_buckets(owner)
                # No count stored: the owner has written nothing since buckets exist, so only bucket 0 can hold
                # records; its count is looked for again every block period until its first write stores it.
                buckets = stored or Buckets.of(owner, 1)
                positions = decode_cursor(cursor, buckets.count) if cursor else []
                await take_places(places, self._watchers, buckets.count)
                if not cursor:
                    positions = await self.store.last_ids(buckets)
                merged = MergedWatch(self._watch_reader(), buckets, positions)
                places.push_async_callback(merged.close)
                loop = asyncio.get_running_loop()
                look_again_at = loop.time() + block_seconds
                while not self._closing.is_set() and not context.done():
                    if stored is None and loop.time() >= look_again_at:
                        look_again_at = loop.time() + block_seconds
                        stored = await self.store.stored_buckets(owner)
                        if stored is not None and stored.count > 1:
                            await take_places(places, self._watchers, stored.count - 1)
                            merged.grow(stored)
                    batch = await merged.next_batch(block_seconds)
                    if batch is None:
                        continue
                    index, entries, delivered = batch
                    for entry_id, record in entries:
                        merged.positions[index] = entry_id
                        yield cdr_pb2.WatchCdrsResponse(record=record, cursor=merged.cursor)
                    delivered.set()

    def _watch_reader(self) -> ReadAfter:
        async def read_after(bucket: Bucket, after: str) -> Entries:
            return await self.store.read_after(
                self.watch_redis, bucket, after, count=WATCH_COUNT, block_ms=self.settings.watch_block_ms
            )

        return read_after

    # --- counters and signals ----------------------------------------------------------------------

    async def GetCdrStats(self, request: cdr_pb2.GetCdrStatsRequest, context: Context) -> cdr_pb2.GetCdrStatsResponse:  # noqa: N802
        owner = self._owner(request.tenant_id, False)
        if request.date:
            if not _DATE.fullmatch(request.date):
                raise InvalidArgument.field("date", "must be YYYY-MM-DD (Beijing time)")
            try:
                day = dt.date.fromisoformat(request.date)
            except ValueError:
                raise InvalidArgument.field("date", "is not a calendar date") from None
        else:
            day = dt.datetime.fromtimestamp(self.clock.now_ms() / 1000, BEIJING).date()
        stats = await self.store.daily(await self.store.buckets(owner), day.strftime("%Y%m%d"))
        return cdr_pb2.GetCdrStatsResponse(
            tenant_id=owner,
            date=day.isoformat(),
            calls=stats.calls,
            answered=stats.answered,
            billable_seconds=stats.billable_seconds,
        )

    async def GetAbuseSignals(  # noqa: N802
        self, request: cdr_pb2.GetAbuseSignalsRequest, context: Context
    ) -> cdr_pb2.GetAbuseSignalsResponse:
        owner = self._owner(request.tenant_id, request.unmatched)
        if request.virtual_number:
            try:
                validate_virtual(request.virtual_number)
            except InvalidNumber as exc:
                raise InvalidArgument.field("virtual_number", str(exc)) from None
        counters = await self.store.abuse(
            await self.store.buckets(owner),
            self.clock.now_ms(),
            request.virtual_number,
            limit=self.settings.max_abuse_signals,
        )
        counters.sort(key=lambda c: (not c.flagged, -c.window_start_ms, -(c.short + c.unanswered), c.virtual_number))
        signals = []
        for c in counters:
            signal = cdr_pb2.AbuseSignal(
                virtual_number=c.virtual_number,
                calling_number=mask(c.calling_number),
                total_calls=c.total,
                short_calls=c.short,
                unanswered_calls=c.unanswered,
                flagged=c.flagged,
                window_start=timestamp_from_ms(c.window_start_ms),
            )
            signals.append(signal)
        return cdr_pb2.GetAbuseSignalsResponse(signals=signals)
