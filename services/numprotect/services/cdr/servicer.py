"""The CdrService servicer: ingestion (batch and client stream), listing, live watch, counters, abuse signals.

Who may call what is the policy table's (numprotect.core.identity.policy): carriers ingest, tenants and the operator
read. Here: the carrier of a stored record is the caller's, and only for numbers it routes (`Reporter`); a read
acts for the caller's own tenant (a tenant key) or the one the operator names; the unmatched bucket (records no
binding matched) is the operator's only.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import AsyncIterator
from typing import Any

import grpc

from numprotect.cdr.v1 import cdr_pb2, cdr_pb2_grpc
from numprotect.core.cdr_keys import Bucket
from numprotect.core.clock import Clock
from numprotect.core.conversions import optional_timestamp_ms, timestamp_from_ms
from numprotect.core.errors import InvalidArgument, PermissionDenied, ResourceExhausted
from numprotect.core.identifiers import OUT_ORDER_ID, TENANT_ID
from numprotect.core.identity.layer import Callers
from numprotect.core.identity.principal import Role
from numprotect.core.limits import ConcurrencyLimit
from numprotect.core.page_tokens import PageTokenKey, PageTokens
from numprotect.core.phone import InvalidNumber, mask, validate_virtual
from numprotect.core.redis_client import RedisClient
from numprotect.services.cdr.ingest import Ingestor, Reporter, Summary
from numprotect.services.cdr.settings import CdrSettings
from numprotect.services.cdr.store import BEIJING, CdrStore
from numprotect.services.cdr.validation import RECORD_ID
from numprotect.services.cdr.watch_slots import WatchSlots

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# StreamCdrs stores what it received every this many records (and at the end of the stream).
STREAM_CHUNK = 500
# WatchCdrs reads at most this many records per XREAD.
WATCH_COUNT = 200
# A stream entry id "<ms>-<seq>", each part a 64-bit unsigned number (Redis refuses more: it was INTERNAL).
_CURSOR = re.compile(r"(\d{1,20})-(\d{1,20})", re.ASCII)
_ID_PART_MAX = 2**64 - 1
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)

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
        # Blocking XREADs hold a connection each: watchers get their own pool, bounded by max_watchers; one more
        # watcher is refused at once (RESOURCE_EXHAUSTED), it does not wait for a place.
        self.watch_redis = watch_redis
        self._watchers = ConcurrencyLimit(
            settings.max_watchers,
            wait_seconds=0,
            name="WatchCdrs streams (NUMPROTECT_CDR_MAX_WATCHERS)",
            exhausted=True,
        )
        self.watch_slots = WatchSlots(settings.max_watchers_per_tenant)
        self._closing = asyncio.Event()

    async def close(self) -> None:
        """Ends the watch loops at their next read (shutdown, before the watch connections close)."""
        self._closing.set()

    # --- whose records ------------------------------------------------------------------------------

    def _bucket(self, tenant_id: str, unmatched: bool) -> Bucket:
        """The bucket a read acts on: the caller's own tenant (a tenant key; another is PERMISSION_DENIED), the
        tenant the operator names, or the unmatched records (the operator's only)."""
        if unmatched:
            if tenant_id:
                raise InvalidArgument.field("tenant_id", "must be empty when unmatched is set")
            if self.callers.principal().role is Role.TENANT:
                raise PermissionDenied(
                    "unmatched: records that matched no binding are the operator's to read", reason="OPERATOR_ONLY"
                )
            return Bucket("")
        try:
            tenant = self.callers.tenant(tenant_id)
        except InvalidArgument:
            raise InvalidArgument.field(
                "tenant_id", "is required (or set unmatched for records no binding matched)"
            ) from None
        return Bucket(TENANT_ID.check("tenant_id", tenant))

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
        bucket = self._bucket(request.tenant_id, request.unmatched)
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
        if request.binding_id:
            index = bucket.binding_index(request.binding_id)
        elif request.out_order_id:
            index = bucket.order_index(request.out_order_id)
        else:
            index = bucket.time_index
        # Everything that shapes the listing (not page_size): a token continues only the query that issued it.
        query = [
            bucket.tenant_id,
            "1" if request.unmatched else "0",
            request.binding_id,
            request.out_order_id,
            "" if start_ms is None else str(start_ms),
            "" if end_ms is None else str(end_ms),
        ]
        after = None
        if request.page_token:
            score, member = self.list_tokens.decode(request.page_token, query=query, fields=2)
            after = (score, member)
        page = await self.store.page(
            index,
            bucket,
            min_score=str(start_ms) if start_ms is not None else "-inf",
            max_score=f"({end_ms}" if end_ms is not None else "+inf",
            after=after,
            limit=page_size,
        )
        records = [record for _id, record in page.records]
        if request.binding_id and request.out_order_id:
            records = [r for r in records if r.out_order_id == request.out_order_id]
        token = self.list_tokens.encode([page.last_score, page.last_member], query=query) if page.more else ""
        return cdr_pb2.ListCdrsResponse(records=records, next_page_token=token)

    # --- watch -------------------------------------------------------------------------------------

    async def WatchCdrs(  # noqa: N802
        self, request: cdr_pb2.WatchCdrsRequest, context: Context
    ) -> AsyncIterator[cdr_pb2.WatchCdrsResponse]:
        # The stream watched is the caller's own tenant's (or the one the operator names): a cursor only moves
        # within it, so "0" replays the caller's own records and nobody else's.
        bucket = self._bucket(request.tenant_id, request.unmatched)
        cursor = request.cursor
        if cursor not in ("", "0") and not _is_entry_id(cursor):
            raise InvalidArgument.field("cursor", 'must be "", "0" or a cursor a previous WatchCdrs response carried')
        principal = self.callers.principal()
        with self.watch_slots.hold(f"{principal.role.value}:{principal.id}"):
            # One generator, no nested one: closing it (cancel, revocation) gives both places back at once.
            async with self._watchers:
                if cursor == "":
                    cursor = await self.store.last_id(bucket)
                elif cursor == "0":
                    cursor = "0-0"
                while not self._closing.is_set() and not context.done():
                    entries = await self.store.read_after(
                        self.watch_redis, bucket, cursor, count=WATCH_COUNT, block_ms=self.settings.watch_block_ms
                    )
                    for entry_id, record in entries:
                        yield cdr_pb2.WatchCdrsResponse(record=record, cursor=entry_id)
                        cursor = entry_id

    # --- counters and signals ----------------------------------------------------------------------

    async def GetCdrStats(self, request: cdr_pb2.GetCdrStatsRequest, context: Context) -> cdr_pb2.GetCdrStatsResponse:  # noqa: N802
        bucket = self._bucket(request.tenant_id, False)
        if request.date:
            if not _DATE.fullmatch(request.date):
                raise InvalidArgument.field("date", "must be YYYY-MM-DD (Beijing time)")
            try:
                day = dt.date.fromisoformat(request.date)
            except ValueError:
                raise InvalidArgument.field("date", "is not a calendar date") from None
        else:
            day = dt.datetime.fromtimestamp(self.clock.now_ms() / 1000, BEIJING).date()
        stats = await self.store.daily(bucket, day.strftime("%Y%m%d"))
        return cdr_pb2.GetCdrStatsResponse(
            tenant_id=bucket.tenant_id,
            date=day.isoformat(),
            calls=stats.calls,
            answered=stats.answered,
            billable_seconds=stats.billable_seconds,
        )

    async def GetAbuseSignals(  # noqa: N802
        self, request: cdr_pb2.GetAbuseSignalsRequest, context: Context
    ) -> cdr_pb2.GetAbuseSignalsResponse:
        bucket = self._bucket(request.tenant_id, request.unmatched)
        if request.virtual_number:
            try:
                validate_virtual(request.virtual_number)
            except InvalidNumber as exc:
                raise InvalidArgument.field("virtual_number", str(exc)) from None
        counters = await self.store.abuse(
            bucket, self.clock.now_ms(), request.virtual_number, limit=self.settings.max_abuse_signals
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


def _is_entry_id(cursor: str) -> bool:
    """True for a stream entry id Redis takes: two ASCII numbers that each fit in 64 bits."""
    match = _CURSOR.fullmatch(cursor)
    return match is not None and all(int(part) <= _ID_PART_MAX for part in match.groups())
