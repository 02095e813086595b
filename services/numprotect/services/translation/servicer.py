"""The TranslationService servicer on grpc.aio: Translate, TranslateStream and the blocklist RPCs."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from google.protobuf import timestamp_pb2
from redis.exceptions import NoScriptError

from numprotect.core.errors import InvalidArgument, Unavailable
from numprotect.core.interceptors import as_domain_error
from numprotect.core.redis_client import RedisClient
from numprotect.services.translation.blocklist import BlocklistStore, StoredEntry, scope_of
from numprotect.services.translation.core import SCRIPT, Prepared, StreamBatch, Translator
from numprotect.services.translation.numbers import normalize_caller
from numprotect.translation.v1 import translation_pb2, translation_pb2_grpc

_PAGE_DEFAULT = 100
_PAGE_MAX = 1000


def redis_budget(remaining: float | None, cap: float) -> float:
    """Seconds the hot path may wait for Redis: the cap, or less so UNAVAILABLE arrives before the deadline."""
    if remaining is None:
        return cap
    # Keep a margin for the cancellation and the answer to travel back on a loaded host: 100 ms, or half of
    # a short deadline (a 200 ms deadline waits 100 ms for Redis).
    return max(0.0, min(cap, remaining - min(0.1, remaining / 2)))


class TranslationServiceServicer(translation_pb2_grpc.TranslationServiceServicer):
    def __init__(self, redis: RedisClient, translator: Translator, blocklist: BlocklistStore) -> None:
        self.redis = redis
        self.translator = translator
        self.blocklist = blocklist
        self.cap = translator.settings.redis_timeout_seconds
        self.batch = translator.settings.stream_batch

    async def Translate(  # noqa: N802
        self, request: translation_pb2.TranslateRequest, context: Any
    ) -> translation_pb2.TranslateResponse:
        prepared = self.translator.prepare(request)
        if not isinstance(prepared, Prepared):
            return prepared
        budget = redis_budget(context.time_remaining(), self.cap)
        try:
            async with asyncio.timeout(budget):
                reply = await SCRIPT(self.redis, prepared.keys, prepared.args)
        except TimeoutError:
            raise Unavailable(f"translation storage did not answer within {budget * 1000:.0f} ms") from None
        return self.translator.finish(prepared, reply, self.translator.recording_span())

    async def TranslateStream(  # noqa: N802
        self, request_iterator: AsyncIterator[translation_pb2.TranslateStreamRequest], context: Any
    ) -> AsyncIterator[translation_pb2.TranslateStreamResponse]:
        """Requests queue while a batch is in Redis; each batch is one pipeline of EVALSHAs."""
        queue: asyncio.Queue[translation_pb2.TranslateStreamRequest | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for message in request_iterator:
                    queue.put_nowait(message)
            finally:
                queue.put_nowait(None)

        reader = asyncio.create_task(read(), name="translate-stream-reader")
        try:
            done = False
            while not done:
                first = await queue.get()
                if first is None:
                    break
                batch = [first]
                while len(batch) < self.batch and not queue.empty():
                    message = queue.get_nowait()
                    if message is None:
                        done = True
                        break
                    batch.append(message)
                for response in await self.translate_batch(batch):
                    yield response
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def translate_batch(
        self, messages: Sequence[translation_pb2.TranslateStreamRequest]
    ) -> list[translation_pb2.TranslateStreamResponse]:
        batch = StreamBatch(self.translator, messages)
        if not batch.pending:
            return batch.responses
        try:
            async with asyncio.timeout(self.cap):
                replies = await self._pipeline([p for _, p in batch.pending])
        except TimeoutError:
            return batch.fail(Unavailable(f"translation storage did not answer within {self.cap * 1000:.0f} ms"))
        except Exception as exc:
            return batch.fail(as_domain_error(exc, "TranslateStream") or Unavailable("translation storage failed"))
        return batch.complete(replies)

    async def _pipeline(self, batch: list[Prepared]) -> list[Any]:
        for attempt in range(2):
            pipe = self.redis.pipeline(transaction=False)
            for prepared in batch:
                # execute_command: the cluster pipeline refuses .evalsha(), not EVALSHA itself (keys share a slot)
                pipe.execute_command("EVALSHA", SCRIPT.sha, len(prepared.keys), *prepared.keys, *prepared.args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in replies):
                await SCRIPT.load(self.redis)
                continue
            return replies
        raise AssertionError("unreachable")

    # --- blocklist -------------------------------------------------------------------------------------

    async def BlockCaller(  # noqa: N802
        self, request: translation_pb2.BlockCallerRequest, context: Any
    ) -> translation_pb2.BlockCallerResponse:
        scope_of(request.tenant_id)
        number = normalize_caller(request.calling_number)
        if len(request.reason) > 200:
            raise InvalidArgument.field("reason", "must be at most 200 characters")
        now_ms = int(time.time() * 1000)
        expire_ms = 0
        if request.HasField("ttl"):
            ttl_ms = request.ttl.ToMilliseconds()
            if ttl_ms <= 0:
                raise InvalidArgument.field("ttl", "must be positive when set")
            expire_ms = now_ms + ttl_ms
        entry = StoredEntry(request.tenant_id, number, request.reason.replace("\n", " "), now_ms, expire_ms)
        await self.blocklist.block(entry)
        return translation_pb2.BlockCallerResponse(entry=_entry_message(entry))

    async def UnblockCaller(  # noqa: N802
        self, request: translation_pb2.UnblockCallerRequest, context: Any
    ) -> translation_pb2.UnblockCallerResponse:
        scope_of(request.tenant_id)
        await self.blocklist.unblock(request.tenant_id, normalize_caller(request.calling_number))
        return translation_pb2.UnblockCallerResponse()

    async def ListBlockedCallers(  # noqa: N802
        self, request: translation_pb2.ListBlockedCallersRequest, context: Any
    ) -> translation_pb2.ListBlockedCallersResponse:
        scope_of(request.tenant_id)
        if request.page_size < 0:
            raise InvalidArgument.field("page_size", "must not be negative")
        size = min(request.page_size or _PAGE_DEFAULT, _PAGE_MAX)
        entries = [e for e in await self.blocklist.entries(request.tenant_id) if e.calling_number > request.page_token]
        page = entries[:size]
        response = translation_pb2.ListBlockedCallersResponse(entries=[_entry_message(e) for e in page])
        if len(entries) > size:
            response.next_page_token = page[-1].calling_number
        return response


def _entry_message(entry: StoredEntry) -> translation_pb2.BlockedCaller:
    message = translation_pb2.BlockedCaller(
        tenant_id=entry.tenant_id, calling_number=entry.calling_number, reason=entry.reason
    )
    message.create_time.CopyFrom(_timestamp(entry.create_ms))
    if entry.expire_ms:
        message.expire_time.CopyFrom(_timestamp(entry.expire_ms))
    return message


def _timestamp(ms: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp
