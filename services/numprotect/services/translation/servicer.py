"""The TranslationService servicer on grpcio's thread-pool server: Translate, TranslateStream, the blocklist RPCs.

Translate and TranslateStream validate and answer through `translation.core` and call Redis through
`ScriptClient` (one EVALSHA on blocking sockets, bounded by the call's deadline). The blocklist RPCs are cold:
plain redis-py through `BlocklistStore`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

from opentelemetry.trace import SpanKind

from numprotect.core.clock import Clock
from numprotect.core.conversions import duration_ms, timestamp_from_ms
from numprotect.core.errors import DomainError, InvalidArgument, Unavailable
from numprotect.core.page_tokens import PageTokens
from numprotect.core.telemetry import Telemetry
from numprotect.services.translation.blocklist import BlocklistStore, StoredEntry, scope_of
from numprotect.services.translation.core import Prepared, StreamBatch, Translator
from numprotect.services.translation.fastredis import ScriptClient
from numprotect.services.translation.numbers import normalize_caller
from numprotect.translation.v1 import translation_pb2, translation_pb2_grpc

_PAGE_DEFAULT = 100
_PAGE_MAX = 1000
_REASON_MAX = 200
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
    ) -> None:
        self.client = client
        # A CLIENT span per Redis call, only inside a sampled call (the hot path's client is ours, not redis-py's).
        # Never keys or arguments: they contain phone numbers.
        self.telemetry = telemetry
        self.redis_attributes = client.span_attributes()
        self.translator = translator
        self.blocklist = blocklist
        self.page_tokens = page_tokens
        self.clock = clock
        self.cap = translator.settings.redis_timeout_seconds
        self.batch = translator.settings.stream_batch
        self.combine = translator.settings.combine

    def Translate(  # noqa: N802
        self, request: translation_pb2.TranslateRequest, context: Any
    ) -> translation_pb2.TranslateResponse:
        prepared = self.translator.prepare(request)
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

        The stream holds this handler thread (one of NUMPROTECT_TRANSLATION_WORKERS) for as long as it is open.
        """
        inbox: queue.SimpleQueue[translation_pb2.TranslateStreamRequest | None] = queue.SimpleQueue()

        def read() -> None:
            try:
                for message in request_iterator:
                    inbox.put(message)
            except Exception:  # the client went away: the stream ends below
                pass
            finally:
                inbox.put(None)

        threading.Thread(target=read, name="translate-stream-reader", daemon=True).start()
        done = False
        while not done:
            first = inbox.get()
            if first is None:
                return
            messages = [first]
            while len(messages) < self.batch:
                try:
                    message = inbox.get_nowait()
                except queue.Empty:
                    break
                if message is None:
                    done = True
                    break
                messages.append(message)
            batch = StreamBatch(self.translator, messages)
            if batch.pending:
                try:
                    batch.complete(self._evalsha_many(batch))
                except DomainError as exc:
                    batch.fail(exc)
                except Exception as exc:
                    batch.fail(Unavailable(f"translation storage failed: {exc.__class__.__name__}"))
            yield from batch.responses

    def _evalsha_many(self, batch: StreamBatch) -> list[Any]:
        if batch.span is None:
            return self.client.evalsha_many(batch.calls, self.cap)
        attributes = {**self.redis_attributes, "db.redis.pipeline_length": len(batch.pending)}
        with self.telemetry.child_span("EVALSHA", kind=SpanKind.CLIENT, attributes=attributes):
            return self.client.evalsha_many(batch.calls, self.cap)

    # --- blocklist -------------------------------------------------------------------------------------

    def BlockCaller(  # noqa: N802
        self, request: translation_pb2.BlockCallerRequest, context: Any
    ) -> translation_pb2.BlockCallerResponse:
        scope_of(request.tenant_id)
        number = normalize_caller(request.calling_number)
        if len(request.reason) > _REASON_MAX:
            raise InvalidArgument.field("reason", f"must be at most {_REASON_MAX} characters")
        now_ms = self.clock.now_ms()
        expire_ms = 0
        if request.HasField("ttl"):
            ttl_ms = duration_ms("ttl", request.ttl)
            if ttl_ms <= 0:
                raise InvalidArgument.field("ttl", "must be positive when set")
            expire_ms = now_ms + ttl_ms
        entry = StoredEntry(request.tenant_id, number, request.reason.replace("\n", " "), now_ms, expire_ms)
        self.blocklist.block(entry)
        return translation_pb2.BlockCallerResponse(entry=_entry_message(entry))

    def UnblockCaller(  # noqa: N802
        self, request: translation_pb2.UnblockCallerRequest, context: Any
    ) -> translation_pb2.UnblockCallerResponse:
        scope_of(request.tenant_id)
        self.blocklist.unblock(request.tenant_id, normalize_caller(request.calling_number))
        return translation_pb2.UnblockCallerResponse()

    def ListBlockedCallers(  # noqa: N802
        self, request: translation_pb2.ListBlockedCallersRequest, context: Any
    ) -> translation_pb2.ListBlockedCallersResponse:
        scope_of(request.tenant_id)
        if request.page_size < 0:
            raise InvalidArgument.field("page_size", "must not be negative")
        size = min(request.page_size or _PAGE_DEFAULT, _PAGE_MAX)
        query = (request.tenant_id,)
        after = ""
        if request.page_token:
            (after,) = self.page_tokens.decode(request.page_token, query=query, fields=1)
        entries = [e for e in self.blocklist.entries(request.tenant_id) if e.calling_number > after]
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
