"""The TranslationService servicer on grpcio's sync server: the hot path on blocking sockets.

Translate and TranslateStream share validation, script and response with the aio servicer (translation.core)
and call Redis through `ScriptClient` (one EVALSHA, bounded by the call's deadline). The blocklist RPCs are
cold: they run the aio servicer's code on the background event loop.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

from opentelemetry.trace import SpanKind

from numprotect.core.errors import DomainError, Unavailable
from numprotect.core.server_sync import LoopThread
from numprotect.core.telemetry import Telemetry
from numprotect.services.translation.core import Prepared, StreamBatch, Translator
from numprotect.services.translation.fastredis import ScriptClient
from numprotect.services.translation.servicer import TranslationServiceServicer, redis_budget
from numprotect.translation.v1 import translation_pb2, translation_pb2_grpc

_COLD_TIMEOUT = 30.0


class SyncTranslationServiceServicer(translation_pb2_grpc.TranslationServiceServicer):
    def __init__(
        self,
        client: ScriptClient,
        translator: Translator,
        cold: TranslationServiceServicer,
        loop: LoopThread,
        telemetry: Telemetry,
    ) -> None:
        self.client = client
        # A CLIENT span per Redis call, only inside a sampled call (redis.asyncio clients get theirs from the
        # Redis instrumentation; this client is ours). Never keys or arguments: they contain phone numbers.
        self.telemetry = telemetry
        self.redis_attributes = client.span_attributes()
        self.translator = translator
        self.cold = cold
        self.loop = loop
        self.cap = translator.settings.redis_timeout_seconds
        self.batch = translator.settings.stream_batch
        self.combine = translator.settings.sync_combine

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
        """A reader thread queues requests; this thread answers whatever queued meanwhile in one pipeline."""
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

    def BlockCaller(  # noqa: N802
        self, request: translation_pb2.BlockCallerRequest, context: Any
    ) -> translation_pb2.BlockCallerResponse:
        return self.loop.run(self.cold.BlockCaller(request, context), _COLD_TIMEOUT)

    def UnblockCaller(  # noqa: N802
        self, request: translation_pb2.UnblockCallerRequest, context: Any
    ) -> translation_pb2.UnblockCallerResponse:
        return self.loop.run(self.cold.UnblockCaller(request, context), _COLD_TIMEOUT)

    def ListBlockedCallers(  # noqa: N802
        self, request: translation_pb2.ListBlockedCallersRequest, context: Any
    ) -> translation_pb2.ListBlockedCallersResponse:
        return self.loop.run(self.cold.ListBlockedCallers(request, context), _COLD_TIMEOUT)
