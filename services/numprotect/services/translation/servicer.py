"""The TranslationService servicer on grpcio's thread-pool server: Translate, TranslateStream, the blocklist RPCs.

Translate and TranslateStream validate and answer through `translation.core` and call Redis through
`ScriptClient` (one EVALSHA on blocking sockets, bounded by the call's deadline). The blocklist RPCs are cold:
plain redis-py through `BlocklistStore`.

Who may call (the policy table decides the role, numprotect.core.identity.policy; this servicer the scope, through
`Callers`): carriers translate numbers of the blocks they route (an in-memory lookup, no Redis round trip);
tenants keep their own blocklist (an empty tenant_id is their own); the operator names a tenant's list or, with an
empty tenant_id, the platform-wide (global) list. docs/translation.md.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from typing import Any

from opentelemetry.trace import SpanKind

from numprotect.core.clock import Clock
from numprotect.core.conversions import bounded_duration_ms, timestamp_from_ms
from numprotect.core.errors import DomainError, InvalidArgument, ResourceExhausted, Unavailable
from numprotect.core.identity.layer import Callers
from numprotect.core.identity.principal import Role
from numprotect.core.page_tokens import PageTokens
from numprotect.core.telemetry import Telemetry
from numprotect.services.translation.blocklist import MAX_TTL_MS, BlocklistStore, StoredEntry, scope_of
from numprotect.services.translation.core import Prepared, StreamBatch, Translator
from numprotect.services.translation.fastredis import ScriptClient
from numprotect.services.translation.inbox import StreamInbox
from numprotect.services.translation.numbers import normalize_caller
from numprotect.translation.v1 import translation_pb2, translation_pb2_grpc

_PAGE_DEFAULT = 100
LIST_BLOCKED_CALLERS = "translation.ListBlockedCallers"


def redis_budget(remaining: float | None, cap: float) -> float:
    """Seconds the hot path may wait for Redis: the cap, or less so UNAVAILABLE arrives before the deadline."""
    if remaining is None:
        return cap
    # Keep a margin for the cancellation and the answer to travel back on a loaded host: 100 ms, or half of
    # a short deadline (a 200 ms deadline waits 100 ms for Redis).
    return max(0.0, min(cap, remaining - min(0.1, remaining / 2)))


class TranslationServiceServicer(translation_pb2_grpc.TranslationServiceServicer):
    def __init__(
        self,
        client: ScriptClient,
        translator: Translator,
        blocklist: BlocklistStore,
        page_tokens: PageTokens,
        clock: Clock,
        telemetry: Telemetry,
        callers: Callers,
    ) -> None:
        self.client = client
        self.callers = callers
        # Raises PERMISSION_DENIED for a carrier's call on a number of a block it does not route.
        self.authorize = functools.partial(callers.require_carrier_routes, field="called_number")
        # A CLIENT span per Redis call, only inside a sampled call (the hot path's client is ours, not redis-py's).
        # Never keys or arguments: they contain phone numbers.
        self.telemetry = telemetry
        self.redis_attributes = client.span_attributes()
        self.translator = translator
        self.blocklist = blocklist
        self.page_tokens = page_tokens
        self.clock = clock
        self.cap = translator.settings.redis_timeout_seconds
        self.settings = translator.settings
        self.batch = translator.settings.stream_batch
        self.combine = translator.settings.combine
        self.stream_slots = threading.BoundedSemaphore(translator.settings.max_streams)

    def Translate(  # noqa: N802
        self, request: translation_pb2.TranslateRequest, context: Any
    ) -> translation_pb2.TranslateResponse:
        prepared = self.translator.prepare(request, self.authorize)
        if not isinstance(prepared, Prepared):
            return prepared
        budget = redis_budget(context.time_remaining(), self.cap)
        span = self.translator.recording_span()
        if span is None:
            return self.translator.finish(prepared, self._evalsha(prepared, budget))
        with self.telemetry.child_span("EVALSHA", kind=SpanKind.CLIENT, attributes=self.redis_attributes):
            reply = self._evalsha(prepared, budget)
        return self.translator.finish(prepared, reply, span)

    def _evalsha(self, prepared: Prepared, budget: float) -> Any:
        if self.combine:
            return self.client.evalsha_combined(prepared.keys, prepared.args, budget)
        return self.client.evalsha(prepared.keys, prepared.args, budget)

    def TranslateStream(  # noqa: N802
        self, request_iterator: Iterator[translation_pb2.TranslateStreamRequest], context: Any
    ) -> Iterator[translation_pb2.TranslateStreamResponse]:
        """A reader thread queues requests; this thread answers whatever queued meanwhile in one pipeline.

        The stream holds this handler thread (one of NUMPROTECT_TRANSLATION_WORKERS) for as long as it is open, so
        at most NUMPROTECT_TRANSLATION_MAX_STREAMS are open at once (RESOURCE_EXHAUSTED beyond). The queue holds at
        most NUMPROTECT_TRANSLATION_STREAM_QUEUE calls: beyond it the reader stops reading and HTTP/2 flow control
        pushes back on the client; a client that stops reading answers blocks this thread the same way (grpcio
        sends one response at a time), so nothing on the stream grows without bound. The principal the call layer
        made current on this thread is the one `authorize` checks each call against (the reader thread does not
        need it); a key revoked meanwhile fails the layer's check of the next message, in the reader, which ends
        the stream with UNAUTHENTICATED here.
        """
        if not self.stream_slots.acquire(blocking=False):
            raise ResourceExhausted(
                f"at most {self.settings.max_streams} open TranslateStreams per process "
                "(NUMPROTECT_TRANSLATION_MAX_STREAMS): retry later or on another replica",
                subject="NUMPROTECT_TRANSLATION_MAX_STREAMS",
            )
        inbox = StreamInbox(self.settings.stream_queue)
        try:
            threading.Thread(
                target=inbox.fill, args=(request_iterator,), name="translate-stream-reader", daemon=True
            ).start()
            authorize = self.authorize
            while messages := inbox.take(self.batch):
                batch = StreamBatch(self.translator, messages, authorize)
                if batch.pending:
                    try:
                        batch.complete(self._evalsha_many(batch))
                    except DomainError as exc:
                        batch.fail(exc)
                    except Exception as exc:
                        batch.fail(Unavailable(f"translation storage failed: {exc.__class__.__name__}"))
                yield from batch.responses
        finally:
            inbox.close()
            self.stream_slots.release()

    def _evalsha_many(self, batch: StreamBatch) -> list[Any]:
        if batch.span is None:
            return self.client.evalsha_many(batch.calls, self.cap)
        attributes = {**self.redis_attributes, "db.redis.pipeline_length": len(batch.pending)}
        with self.telemetry.child_span("EVALSHA", kind=SpanKind.CLIENT, attributes=attributes):
            return self.client.evalsha_many(batch.calls, self.cap)

    # --- blocklist -------------------------------------------------------------------------------------

    def _list_of(self, requested: str) -> str:
        """The tenant whose list the call names, "" for the global list.

        A tenant key: its own list only (empty means it; another tenant is PERMISSION_DENIED). The operator: the
        tenant it names, or the global list for an empty tenant_id (the policy audits every operator call).
        """
        if self.callers.principal().role is Role.TENANT:
            return self.callers.tenant(requested)
        return requested

    def BlockCaller(  # noqa: N802
        self, request: translation_pb2.BlockCallerRequest, context: Any
    ) -> translation_pb2.BlockCallerResponse:
        tenant_id = self._list_of(request.tenant_id)
        scope_of(tenant_id)
        number = normalize_caller(request.calling_number)
        most = self.settings.block_reason_max
        if len(request.reason) > most:
            raise InvalidArgument.field(
                "reason", f"must be at most {most} characters (NUMPROTECT_TRANSLATION_BLOCK_REASON_MAX)"
            )
        now_ms = self.clock.now_ms()
        expire_ms = 0
        if request.HasField("ttl"):
            # Bounded before anything is stored: now + ttl must stay a Timestamp (it is listed as expire_time).
            expire_ms = now_ms + bounded_duration_ms("ttl", request.ttl, 1, MAX_TTL_MS)
        entry = StoredEntry(tenant_id, number, request.reason.replace("\n", " "), now_ms, expire_ms)
        self.blocklist.block(entry)
        return translation_pb2.BlockCallerResponse(entry=_entry_message(entry))

    def UnblockCaller(  # noqa: N802
        self, request: translation_pb2.UnblockCallerRequest, context: Any
    ) -> translation_pb2.UnblockCallerResponse:
        tenant_id = self._list_of(request.tenant_id)
        scope_of(tenant_id)
        self.blocklist.unblock(tenant_id, normalize_caller(request.calling_number))
        return translation_pb2.UnblockCallerResponse()

    def ListBlockedCallers(  # noqa: N802
        self, request: translation_pb2.ListBlockedCallersRequest, context: Any
    ) -> translation_pb2.ListBlockedCallersResponse:
        tenant_id = self._list_of(request.tenant_id)
        scope_of(tenant_id)
        most = self.settings.blocklist_page_max
        if request.page_size < 0:
            raise InvalidArgument.field("page_size", "must not be negative")
        if request.page_size > most:
            raise InvalidArgument.field(
                "page_size", f"must be at most {most} (NUMPROTECT_TRANSLATION_BLOCKLIST_PAGE_MAX)"
            )
        size = request.page_size or min(_PAGE_DEFAULT, most)
        query = (tenant_id,)
        after = ""
        if request.page_token:
            (after,) = self.page_tokens.decode(request.page_token, query=query, fields=1)
        entries = [e for e in self.blocklist.entries(tenant_id) if e.calling_number > after]
        page = entries[:size]
        response = translation_pb2.ListBlockedCallersResponse(entries=[_entry_message(e) for e in page])
        if len(entries) > size:
            response.next_page_token = self.page_tokens.encode((page[-1].calling_number,), query=query)
        return response


def _entry_message(entry: StoredEntry) -> translation_pb2.BlockedCaller:
    message = translation_pb2.BlockedCaller(
        tenant_id=entry.tenant_id, calling_number=entry.calling_number, reason=entry.reason
    )
    message.create_time.CopyFrom(timestamp_from_ms(entry.create_ms))
    if entry.expire_ms:
        message.expire_time.CopyFrom(timestamp_from_ms(entry.expire_ms))
    return message
