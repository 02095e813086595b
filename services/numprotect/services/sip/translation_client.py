"""The adapter's client of translation: a few long-lived TranslateStreams carrying the calls batched.

Calls submitted in one event-loop iteration go out as ONE `TranslateStreamRequest.requests` message (at most
NUMPROTECT_SIP_BATCH_MAX calls), on the streams in turn. While the chosen stream is busy (writing, or its last
message unanswered), the message stays open and later iterations' calls join it until the stream is free: batches
grow with the load (fewer, larger messages: less work per call on both sides), never by a timer (an idle adapter
sends each call at the end of its loop iteration). A message held so waits at most HOLD_SHARE of the timeout: a slow
translation must not make a call wait a whole answer for the message before it. Translation answers such a message
with one message whose `responses` follow its order, so each stream matches answers to its messages first in, first
out, and checks every call_id (a mismatch ends the stream: its calls fail, it reconnects). A call never waits past
its deadline (NUMPROTECT_SIP_TRANSLATE_TIMEOUT): one timer per message fails the calls still waiting
(DEADLINE_EXCEEDED), and their late answers are dropped. With no stream up a call fails at once (UNAVAILABLE), so
the switch gets its 503 at once too.

A stream is "up" once translation has answered a probe on it (an empty call, answered INVALID_ARGUMENT): that proves
the TLS connection, the credential and the stream limit before any call rides on it. An idle stream is probed every
IDLE_PROBE_SECONDS; a stream with messages outstanding that received nothing for the stall limit (a stopped or
wedged translation process) is ended. An ended stream fails its calls at once (UNAVAILABLE) and reopens after a
jittered backoff from 50 ms doubling to 2 s.

Per call the hot path makes one request sub-message and one future (and one await via `translate`, or one done
callback via `submit`, the handler's path); a message (batch) adds the message, its timer and one callback that
hands it to the stream's writer.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from numprotect.core.metrics import Metrics
from numprotect.services.sip.errors import failure_summary
from numprotect.services.sip.settings import SipSettings
from numprotect.translation.v1 import translation_pb2, translation_pb2_grpc

log = logging.getLogger(__name__)

# Reconnect backoff: the first retry after 25-50 ms (jitter: a random half to all of the step), doubling to 2 s.
BACKOFF_MIN_SECONDS = 0.05
BACKOFF_MAX_SECONDS = 2.0
# An open stream with nothing in flight for this long is probed, so a dead peer is noticed without traffic
# (OPTIONS then answers 503 and the trunk fails over).
IDLE_PROBE_SECONDS = 5.0
# How often each open stream checks for a stall and idleness.
WATCH_SECONDS = 0.25
# A stream with messages outstanding and nothing at all received on it for this long is ended (a stopped or wedged
# translation process): the translation timeout times this, at least STALL_MIN_SECONDS, so that a host stall of a
# second or two (either side's process not scheduled) costs deadlines, never a reconnect that fails every call in
# flight at once.
STALL_FACTOR = 5.0
STALL_MIN_SECONDS = 3.0
# Messages a stream has unanswered before the next one waits (joined by later calls) for an answer: 1 measured
# better than 2 (make bench BENCH_ARGS=sip: adapter 350-405 against 396-412 us per call, translation 99-113 against
# 118-127), at most a translation round trip (~1 ms) more for a call that comes while one is out.
MESSAGES_IN_FLIGHT = 1
# A message held back behind a busy stream goes out anyway after this share of the translation timeout: when
# translation answers slowly (100 ms and more), a call must not wait a whole answer for the message before it, which
# costs its deadline (at the 200 ms default: held at most 20 ms). A fast translation answers long before, so the
# batches under load are unchanged.
HOLD_SHARE = 0.1
# close(): the longest wait for the streams to end.
CLOSE_SECONDS = 2.0

Answer = translation_pb2.TranslateResponse


@dataclass(frozen=True, slots=True)
class CallSetup:
    calling_number: str  # normalised (phone.normalize_calling)
    called_number: str  # 15-digit 700 number
    extension: str  # "" or 1-4 digits
    call_id: str  # the SIP Call-ID
    traceparent: str = ""  # W3C traceparent of the INVITE span when it is sampled, else ""


@dataclass(frozen=True, slots=True)
class TranslateFailure:
    status: str  # "INVALID_ARGUMENT", "PERMISSION_DENIED", "UNAVAILABLE", "DEADLINE_EXCEEDED", ...
    message: str  # safe to log (no token); numbers masked by the caller when logged


_NO_STREAM = TranslateFailure("UNAVAILABLE", "no translation stream is up")
_DEADLINE = TranslateFailure("DEADLINE_EXCEEDED", "translation did not answer within NUMPROTECT_SIP_TRANSLATE_TIMEOUT")
# An empty call: translation answers it INVALID_ARGUMENT, which proves the stream works end to end.
_PROBE = translation_pb2.TranslateStreamRequest(request=translation_pb2.TranslateRequest())


def failure_of(error: str) -> TranslateFailure:
    """A stream answer's `error` ("<STATUS>: <message>") as a TranslateFailure."""
    status, separator, message = error.partition(": ")
    if separator and status.isupper() and status.replace("_", "").isalpha():
        return TranslateFailure(status, message)
    return TranslateFailure("UNKNOWN", error)


class _Batch:
    """One message: its calls' ids and futures in message order, its deadline timer, when it was sent."""

    __slots__ = ("call_ids", "due", "futures", "message", "queued", "sent", "stream", "timer")

    def __init__(self, stream: _Stream, message: translation_pb2.TranslateStreamRequest, due: float = 0.0) -> None:
        self.stream = stream
        self.message = message
        self.due = due  # loop time from which it is sent even while its stream's window is full (HOLD_SHARE)
        self.call_ids: list[str] = []
        self.futures: list[asyncio.Future[Answer | TranslateFailure]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.sent = 0.0
        self.queued = False  # handed to the stream's writer (no call joins it any more)

    def fail(self, failure: TranslateFailure) -> None:
        if self.timer is not None:
            self.timer.cancel()
        for future in self.futures:
            if not future.done():
                future.set_result(failure)


class _Stream:
    """One TranslateStream slot: its channel, the open call (if any), messages to send and messages in flight."""

    def __init__(self, index: int, channel: grpc.aio.Channel) -> None:
        self.index = index
        self.channel = channel
        self.stub: Any = translation_pb2_grpc.TranslationServiceStub(channel)  # TranslateStream() without iterator
        self.up = False
        self.call: Any = None
        self.outbox: deque[_Batch] = deque()
        self.inflight: deque[_Batch] = deque()
        self.writer_idle: asyncio.Future[None] | None = None  # set while the writer waits for a message
        self.writing = False  # a write is in flight
        self.answered = 0.0  # loop time of the last answer
        self.proven: asyncio.Future[None] | None = None  # the first answer of this call

    @property
    def busy(self) -> bool:
        """Writing, or as many messages unanswered as may be: a new message waits (and grows)."""
        return self.writing or len(self.inflight) >= MESSAGES_IN_FLIGHT

    def wake_writer(self) -> None:
        idle, self.writer_idle = self.writer_idle, None
        if idle is not None and not idle.done():
            idle.set_result(None)

    def fail_all(self, failure: TranslateFailure) -> None:
        while self.inflight:
            self.inflight.popleft().fail(failure)
        while self.outbox:
            self.outbox.popleft().fail(failure)


class TranslationClient:
    """Translates calls over NUMPROTECT_SIP_STREAMS TranslateStreams (see the module). `translate` never raises."""

    def __init__(
        self, channel_factory: Callable[[], grpc.aio.Channel], settings: SipSettings, metrics: Metrics
    ) -> None:
        self._channel_factory = channel_factory
        self._count = settings.streams
        self._timeout = settings.translate_timeout
        self._batch_max = settings.batch_max
        self._stall = max(STALL_MIN_SECONDS, STALL_FACTOR * settings.translate_timeout)
        self._hold = HOLD_SHARE * settings.translate_timeout
        self._streams: list[_Stream] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._filling: _Batch | None = None  # the message this loop iteration's calls go into
        self._turn = -1
        self._up = 0
        self._closing = False
        self._started_on: asyncio.AbstractEventLoop | None = None  # start()'s loop: see `_loop`
        self._streams_gauge = metrics.gauge(
            "numprotect_sip_translation_streams", "TranslateStreams open to translation (answered their probe)."
        )
        # Why streams end (a revoked key: UNAUTHENTICATED), where the calls that then find no stream count UNAVAILABLE.
        self._stream_ends = metrics.counter(
            "numprotect_sip_translation_stream_ends",
            "TranslateStreams ended (or refused when opened), by the gRPC status they ended with.",
            ("status",),
        )

    async def start(self) -> None:
        """Opens the streams in the background (returns at once; `up` turns true when one is proven)."""
        self._started_on = asyncio.get_running_loop()
        for index in range(self._count):
            stream = _Stream(index, self._channel_factory())
            self._streams.append(stream)
            # An empty context: no span of whoever started us becomes the parent of the long-lived calls.
            task = self._loop.create_task(
                self._keep_open(stream), name=f"translation-stream-{index}", context=contextvars.Context()
            )
            self._tasks.append(task)

    @property
    def _loop(self) -> asyncio.AbstractEventLoop:
        """The loop the streams run on; calls before start() are a bug, named as such."""
        loop = self._started_on
        if loop is None:
            raise RuntimeError("TranslationClient: start() first")
        return loop

    @property
    def up(self) -> bool:
        """At least one stream is open and has answered."""
        return self._up > 0

    async def translate(self, call: CallSetup) -> Answer | TranslateFailure:
        """The decision for `call`, or why there is none; at most the translation timeout, at once when no stream
        is up."""
        future = self._enqueue(call)
        return _NO_STREAM if future is None else await future

    def submit(self, call: CallSetup, done: Callable[[Answer | TranslateFailure], None]) -> None:
        """`translate` without a coroutine (the SIP handler's path: no task per call): `done` receives the answer
        from a loop callback, at the latest at the deadline, soon when no stream is up."""
        future = self._enqueue(call)
        if future is None:
            self._loop.call_soon(done, _NO_STREAM)
        else:
            future.add_done_callback(lambda answered: done(answered.result()))

    def _enqueue(self, call: CallSetup) -> asyncio.Future[Answer | TranslateFailure] | None:
        """`call` added to the open message (a new one when none is open or it is full); None when no stream is up."""
        batch = self._filling
        if batch is None or len(batch.futures) >= self._batch_max or not batch.stream.up:
            batch = self._new_batch()
            if batch is None:
                return None
        batch.message.requests.add(
            calling_number=call.calling_number,
            called_number=call.called_number,
            extension=call.extension,
            call_id=call.call_id,
            traceparent=call.traceparent,
        )
        future: asyncio.Future[Answer | TranslateFailure] = self._loop.create_future()
        batch.call_ids.append(call.call_id)
        batch.futures.append(future)
        return future

    async def close(self) -> None:
        """Ends the streams (their calls fail UNAVAILABLE) and closes the channels; bounded by CLOSE_SECONDS."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=CLOSE_SECONDS)
        for stream in self._streams:
            stream.fail_all(TranslateFailure("UNAVAILABLE", "the adapter is closing"))
            try:
                async with asyncio.timeout(CLOSE_SECONDS):
                    await stream.channel.close(grace=None)
            except TimeoutError:
                log.warning("translation channel did not close in time", extra={"stream": stream.index})
        self._tasks.clear()

    # --- batching ----------------------------------------------------------------------------------------------

    def _new_batch(self) -> _Batch | None:
        """A new message on the next stream that is up and not busy (round robin; else the next one up), sealed
        at the end of this loop iteration."""
        streams = self._streams
        chosen: _Stream | None = None
        for _ in range(len(streams)):
            self._turn = (self._turn + 1) % len(streams)
            candidate = streams[self._turn]
            if candidate.up:
                if not candidate.busy and not candidate.outbox:
                    chosen = candidate
                    break
                chosen = chosen or candidate
        if chosen is None:
            return None
        stream = chosen
        full = self._filling
        if full is not None and not full.queued:  # kept open while its stream wrote, now full: queue it
            full.queued = True
            if full.stream.up:
                full.stream.outbox.append(full)
                full.stream.wake_writer()
                self._loop.call_at(full.due, full.stream.wake_writer)  # sent by then, whatever is in flight
            else:
                full.fail(TranslateFailure("UNAVAILABLE", "translation stream ended"))
        loop = self._loop
        batch = _Batch(stream, translation_pb2.TranslateStreamRequest(), loop.time() + self._hold)
        batch.timer = loop.call_later(self._timeout, self._expire, batch)
        loop.call_soon(self._seal, batch)
        self._filling = batch
        return batch

    def _seal(self, batch: _Batch) -> None:
        """The loop iteration that filled `batch` is over: hand it to its stream's writer, unless that stream is
        busy (then later calls join it and the writer takes it when the stream is free)."""
        if batch.queued:
            return  # the writer took it already
        stream = batch.stream
        if not stream.up:
            if self._filling is batch:
                self._filling = None
            batch.fail(TranslateFailure("UNAVAILABLE", "translation stream ended"))
            return
        if self._filling is batch:
            if stream.busy:
                self._loop.call_at(batch.due, self._release, batch)
                return
            self._filling = None
        batch.queued = True
        stream.outbox.append(batch)
        stream.wake_writer()

    def _release(self, batch: _Batch) -> None:
        """A message held back behind its busy stream until its `due` time: queued now, and the writer sends it as
        soon as no write is in progress, whatever the stream has in flight."""
        if batch.queued or self._filling is not batch:
            return
        self._filling = None
        stream = batch.stream
        if not stream.up:
            batch.fail(TranslateFailure("UNAVAILABLE", "translation stream ended"))
            return
        batch.queued = True
        stream.outbox.append(batch)
        stream.wake_writer()

    def _take_filling(self, stream: _Stream) -> _Batch | None:
        """The open message of `stream`, if any, closed for the writer (the stream is free)."""
        batch = self._filling
        if batch is None or batch.stream is not stream or not batch.futures:
            return None
        self._filling = None
        batch.queued = True
        return batch

    def _expire(self, batch: _Batch) -> None:
        """The deadline of `batch`'s calls: those still waiting fail; their answers, if any come, are dropped."""
        batch.timer = None
        for future in batch.futures:
            if not future.done():
                future.set_result(_DEADLINE)

    # --- one stream ----------------------------------------------------------------------------------------------

    async def _keep_open(self, stream: _Stream) -> None:
        """Opens `stream` again and again while the client runs, backing off while it fails."""
        step = BACKOFF_MIN_SECONDS
        quiet = False  # log a failing stream once until it works again
        while not self._closing:
            try:
                proven = await self._session(stream, quiet)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not end the reconnect loop
                log.error("translation stream failed", extra={"stream": stream.index, **failure_summary(exc)})
                proven = False
            if self._closing:
                return
            step = BACKOFF_MIN_SECONDS if proven else min(step * 2, BACKOFF_MAX_SECONDS)
            quiet = not proven
            await asyncio.sleep(step * random.uniform(0.5, 1.0))

    async def _session(self, stream: _Stream, quiet: bool) -> bool:
        """One TranslateStream on `stream` from open to end; True when translation answered on it."""
        loop = asyncio.get_running_loop()
        call = stream.stub.TranslateStream()
        stream.call = call
        stream.proven = loop.create_future()
        reader = loop.create_task(self._read(stream, call))
        writer: asyncio.Task[None] | None = None
        proven = False
        ended = "translation stream ended"
        try:
            stream.outbox.append(_Batch(stream, _PROBE))
            writer = loop.create_task(self._write(stream, call))
            done, _ = await asyncio.wait(
                (reader, stream.proven), timeout=self._stall, return_when=asyncio.FIRST_COMPLETED
            )
            if stream.proven.done():
                proven = True
                stream.up = True
                self._up += 1
                self._streams_gauge.inc()
                log.info("translation stream up", extra={"stream": stream.index})
                ended = await self._watch(stream, reader)
            elif reader not in done:
                ended = "translation stream not answering its probe"
        finally:
            if stream.up:
                stream.up = False
                self._up -= 1
                self._streams_gauge.dec()
            call.cancel()
            for task in (reader, writer):
                if task is not None:
                    task.cancel()
            filling = self._filling
            if filling is not None and filling.stream is stream:
                self._filling = None
                filling.queued = True
                filling.fail(TranslateFailure("UNAVAILABLE", ended))
            stream.fail_all(TranslateFailure("UNAVAILABLE", ended))
            stream.call = None
        code = await _code_of(call)
        if not self._closing:
            self._stream_ends.labels(code).inc()
        if proven or not quiet:
            log.warning(
                "translation stream down",
                extra={"stream": stream.index, "status": code, "error": ended, "was_up": proven},
            )
        return proven

    async def _watch(self, stream: _Stream, reader: asyncio.Task[None]) -> str:
        """Waits for the stream's end; ends a stalled stream, probes an idle one. The reason it ended."""
        loop = asyncio.get_running_loop()
        while True:
            done, _ = await asyncio.wait((reader,), timeout=WATCH_SECONDS)
            if done:
                return "translation stream ended"
            now = loop.time()
            inflight = stream.inflight
            # Silence counted from the last answer, or from the oldest outstanding message when it was sent later
            # (a stream idle before it): answers arriving at all, however late, keep the stream.
            if inflight and inflight[0].sent and now - max(stream.answered, inflight[0].sent) > self._stall:
                return f"translation stream stalled (nothing received for {self._stall:g} s)"
            if not inflight and not stream.outbox and now - stream.answered > IDLE_PROBE_SECONDS:
                stream.answered = now  # one probe per idle period
                stream.outbox.append(_Batch(stream, _PROBE))
                stream.wake_writer()

    async def _write(self, stream: _Stream, call: Any) -> None:
        """Sends the stream's messages in order (one write at a time, as grpc requires)."""
        loop = asyncio.get_running_loop()
        outbox = stream.outbox
        inflight = stream.inflight
        while True:
            while not stream.writing:
                if outbox:
                    # Within the window, or held long enough (`due`): a slow translation must not cost deadlines.
                    if len(inflight) >= MESSAGES_IN_FLIGHT and loop.time() < outbox[0].due:
                        break
                    batch = outbox.popleft()
                elif len(inflight) < MESSAGES_IN_FLIGHT:
                    taken = self._take_filling(stream)
                    if taken is None:
                        break
                    batch = taken
                else:
                    break
                batch.sent = loop.time()
                stream.inflight.append(batch)  # before the write: its answer may come before write() returns
                stream.writing = True
                try:
                    await call.write(batch.message)
                except Exception:  # the call ended (the reader sees it and ends the session)
                    return
                finally:
                    stream.writing = False
            idle: asyncio.Future[None] = loop.create_future()
            stream.writer_idle = idle
            await idle

    async def _read(self, stream: _Stream, call: Any) -> None:
        """Matches each answer to the oldest message in flight; returns when the stream ends or breaks its order."""
        loop = asyncio.get_running_loop()
        inflight = stream.inflight
        while True:
            try:
                message = await call.read()
            except Exception:  # AioRpcError: the stream ended with a status (the session logs it)
                return
            if message is grpc.aio.EOF or not inflight:  # type: ignore[attr-defined]  # grpc's stubs lack it
                return  # ended, or an answer to nothing: the order is lost
            batch = inflight.popleft()
            stream.wake_writer()  # a message may be waiting for this answer
            stream.answered = loop.time()
            proven = stream.proven
            if proven is not None and not proven.done():
                proven.set_result(None)
            if not _answer(batch, message):
                log.warning("translation stream answered out of order: ending it", extra={"stream": stream.index})
                batch.fail(TranslateFailure("UNAVAILABLE", "translation stream answered out of order"))
                return


def _answer(batch: _Batch, message: translation_pb2.TranslateStreamResponse) -> bool:
    """Resolves `batch`'s calls from `message`; False when `message` does not answer `batch` (the order is lost)."""
    futures = batch.futures
    responses = message.responses
    if len(responses) != len(futures):
        if responses or not message.error or not futures:
            return False
        batch.fail(failure_of(message.error))  # an error about the whole message
        return True
    if batch.timer is not None:
        batch.timer.cancel()
        batch.timer = None
    for response, call_id, future in zip(responses, batch.call_ids, futures, strict=True):
        if response.call_id != call_id:
            return False
        if future.done():
            continue  # answered after its deadline: dropped
        error = response.error
        future.set_result(failure_of(error) if error else response.response)
    return True


async def _code_of(call: Any) -> str:
    """The status name the call ended with (CANCELLED when we ended it)."""
    try:
        async with asyncio.timeout(CLOSE_SECONDS):
            code = await call.code()
    except (TimeoutError, grpc.aio.AioRpcError):
        return "UNKNOWN"
    return str(code.name)
