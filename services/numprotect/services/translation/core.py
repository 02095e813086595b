"""The translation decision, independent of the transport that serves it.

`Translator.prepare` validates a request and produces the keys and arguments of the one script
(`lua/translate.lua`) that decides the call in Redis; `Translator.finish` turns the script's reply into
the TranslateResponse. Both are plain functions of their inputs, so unary Translate and the stream batcher
share them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from numprotect.core.call_ref import encode_call_ref
from numprotect.core.calls import domain_error
from numprotect.core.clock import Clock
from numprotect.core.errors import DomainError, InvalidArgument, Unavailable
from numprotect.core.metrics import Metrics
from numprotect.core.phone import mask
from numprotect.core.redis_client import LuaScript, as_text
from numprotect.core.routes import axe_marker_key, axn_key, caller_key, extension_key, lock_key
from numprotect.core.settings import Env
from numprotect.core.telemetry import mask_numbers, set_span_attributes
from numprotect.services.translation.blocklist import MAX_ENTRIES_DEFAULT, BlocklistView
from numprotect.services.translation.numbers import (
    normalize_caller,
    validate_call_id,
    validate_called,
    validate_extension,
)
from numprotect.translation.v1 import translation_pb2

SCRIPT = LuaScript.beside(__file__, "translate.lua")
# The same decision declared read-only: Redis 7 runs it while writes are paused (CLIENT PAUSE WRITE, a failover),
# where it waits out the script above (any script without this flag counts as a write). Its rate counters' writes
# are refused inside, so the limits are not enforced (the reply says NO_WRITES). fastredis sends it then.
READ_ONLY_SCRIPT = LuaScript.from_source("translate_read_only", "#!lua flags=no-writes\n" + SCRIPT.source)

log = logging.getLogger(__name__)
# At most one log line per this many seconds about calls connected without their rate limit.
UNENFORCED_LOG_INTERVAL = 10.0

CONNECT = translation_pb2.DECISION_CONNECT
REJECT = translation_pb2.DECISION_REJECT
COLLECT_EXTENSION = translation_pb2.DECISION_COLLECT_EXTENSION
CALLER_BLOCKED = translation_pb2.REJECT_REASON_CALLER_BLOCKED
# The span of one TranslateStream call that carries its own trace context (TranslateRequest.traceparent).
CALL_SPAN = "translation.call"
_PROPAGATOR = TraceContextTextMapPropagator()

_TEXT = bytes | str
# Raises PermissionDenied when the current caller may not translate the virtual number (layer.Callers).
Authorize = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class TranslationSettings:
    """NUMPROTECT_TRANSLATION_* settings, validated at start-up."""

    # Fixed rate-limit window and the calls allowed in it per (virtual number, caller) and per binding; 0 = off.
    rate_window_ms: int
    rate_per_caller: int
    rate_per_binding: int
    # How often each process polls the blocklist version (the propagation delay of Block/Unblock).
    blocklist_refresh_seconds: float
    # Upper bound of one Redis round trip on the hot path when the call's own deadline is longer or absent.
    redis_timeout_seconds: float
    # Handler threads of the thread-pool server: the most calls served at once, open TranslateStreams included
    # (each holds one for as long as it is open); further calls queue until a thread is free or their deadline.
    workers: int
    # Concurrent Translate calls share one pipelined write to Redis (flat combining).
    combine: bool
    # TranslateStream: the most requests pipelined to Redis in one batch.
    stream_batch: int
    # Limits against a hostile caller (docs/translation.md). TranslateStream: the most calls one message may carry
    # (a larger message is answered by one INVALID_ARGUMENT error message), the calls received but not yet answered
    # per stream (beyond it the stream stops reading: HTTP/2 flow control pushes back on the client), and the open
    # streams per process (RESOURCE_EXHAUSTED beyond it: the other workers stay free for unary Translate).
    stream_max_requests: int
    stream_queue: int
    max_streams: int
    # Blocklists: the most live entries per list (RESOURCE_EXHAUSTED), ListBlockedCallers' largest page_size and
    # an entry's longest reason (INVALID_ARGUMENT).
    blocklist_max_entries: int
    blocklist_page_max: int
    block_reason_max: int

    @classmethod
    def from_env(cls, env: Env) -> TranslationSettings:
        p = "NUMPROTECT_TRANSLATION_"
        workers = env.integer(f"{p}WORKERS", 16, minimum=1, maximum=1024)
        stream_max_requests = env.integer(f"{p}STREAM_MAX_REQUESTS", 1000, minimum=1, maximum=100_000)
        return cls(
            rate_window_ms=round(env.seconds(f"{p}RATE_WINDOW", 60.0, minimum=0.01, maximum=86_400) * 1000),
            rate_per_caller=env.integer(f"{p}RATE_PER_CALLER", 10, minimum=0, maximum=1_000_000),
            rate_per_binding=env.integer(f"{p}RATE_PER_BINDING", 30, minimum=0, maximum=1_000_000),
            blocklist_refresh_seconds=env.seconds(f"{p}BLOCKLIST_REFRESH", 1.0, minimum=0.05, maximum=60),
            redis_timeout_seconds=env.seconds(f"{p}REDIS_TIMEOUT", 0.5, minimum=0.005, maximum=10),
            workers=workers,
            combine=env.flag(f"{p}SYNC_COMBINE", True),
            stream_batch=env.integer(f"{p}STREAM_BATCH", 128, minimum=1, maximum=10_000),
            stream_max_requests=stream_max_requests,
            # At least one full message fits, so every allowed message can be queued.
            stream_queue=env.integer(
                f"{p}STREAM_QUEUE", max(4096, stream_max_requests), minimum=stream_max_requests, maximum=1_000_000
            ),
            # Default: half the workers, so open streams never take every thread from unary Translate.
            max_streams=env.integer(f"{p}MAX_STREAMS", max(1, workers // 2), minimum=1, maximum=workers),
            blocklist_max_entries=env.integer(
                f"{p}BLOCKLIST_MAX_ENTRIES", MAX_ENTRIES_DEFAULT, minimum=1, maximum=10_000_000
            ),
            blocklist_page_max=env.integer(f"{p}BLOCKLIST_PAGE_MAX", 1000, minimum=1, maximum=100_000),
            block_reason_max=env.integer(f"{p}BLOCK_REASON_MAX", 200, minimum=1, maximum=10_000),
        )


class UnenforcedLimits:
    """Calls connected without their rate limit (fail open): Redis refused the counters' write (MISCONF, OOM,
    NOREPLICAS) or the read-only copy served them (NO_WRITES). Counted per cause; one WARNING per interval."""

    def __init__(self, interval: float = UNENFORCED_LOG_INTERVAL) -> None:
        self.interval = interval
        self.calls: dict[str, int] = {}  # cause -> calls since start
        self._lock = threading.Lock()
        self._unlogged: dict[str, int] = {}
        self._logged_at = -interval

    def add(self, cause: str) -> None:
        with self._lock:
            self.calls[cause] = self.calls.get(cause, 0) + 1
            self._unlogged[cause] = self._unlogged.get(cause, 0) + 1
            now = time.monotonic()
            if now - self._logged_at < self.interval:
                return
            self._logged_at = now
            counts, self._unlogged = self._unlogged, {}
        log.warning(
            "rate limits not enforced, calls connected anyway (Redis refused the counters' write, or served the "
            "read-only script): %s in the last %.0f s",
            ", ".join(f"{cause} {count}" for cause, count in sorted(counts.items())),
            self.interval,
        )


class _UnexpectedReason:
    """A reject reason the proto does not name (never sent by translate.lua): its child made on first use."""

    __slots__ = ("counter", "value")

    def __init__(self, counter: Any, value: int) -> None:
        self.counter = counter
        self.value = value

    def inc(self) -> None:
        self.counter.labels("reject", f"reason_{self.value}").inc()


class DecisionCounts:
    """numprotect_translation_decisions{decision, reason}: each answered call of Translate and TranslateStream once.

    The labelled children are resolved here, once: the hot path indexes `rejected` by the reply's reason number and
    calls one `inc()`. Every decision/reason pair the proto names starts at 0 (decision connect | collect_extension
    with reason "none"; reject with the RejectReason name lower-cased, without its prefix).
    """

    __slots__ = ("collect_extension", "connect", "rejected")

    def __init__(self, metrics: Metrics) -> None:
        counter = metrics.counter(
            "numprotect_translation_decisions",
            "Translate and TranslateStream calls answered, by decision and reject reason",
            ("decision", "reason"),
        )
        self.connect = counter.labels("connect", "none")
        self.collect_extension = counter.labels("collect_extension", "none")
        reasons = dict(translation_pb2.RejectReason.items())
        rejected: list[Any] = [_UnexpectedReason(counter, value) for value in range(max(reasons.values()) + 1)]
        for name, value in reasons.items():
            if value:
                rejected[value] = counter.labels("reject", name.removeprefix("REJECT_REASON_").lower())
        self.rejected: tuple[Any, ...] = tuple(rejected)


@dataclass(slots=True)
class Prepared:
    """A validated request and the script invocation that decides it."""

    called: str
    caller: str
    call_id: str
    keys: tuple[str, ...]
    args: tuple[str, ...]


class Translator:
    """Validation, the script call and the response, shared by Translate and TranslateStream."""

    def __init__(
        self,
        settings: TranslationSettings,
        blocklist: BlocklistView,
        clock: Clock,
        *,
        traced: bool = False,
        decisions: DecisionCounts | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        """`traced`: tracing is on (calls' spans may record); `tracer` (with tracing on) makes the spans of
        TranslateStream calls that carry a traceparent (`call_span`)."""
        self.settings = settings
        self.blocklist = blocklist
        self.clock = clock
        self.traced = traced
        self.tracer = tracer if traced else None
        self.unenforced = UnenforcedLimits()
        # numprotect_translation_decisions (no-op children without metrics).
        self.decisions = decisions or DecisionCounts(Metrics("translation", enabled=False))
        self._connected = self.decisions.connect
        self._caller_blocked = self.decisions.rejected[CALLER_BLOCKED]
        self._limits = (str(settings.rate_window_ms), str(settings.rate_per_caller), str(settings.rate_per_binding))

    def prepare(
        self, request: translation_pb2.TranslateRequest, authorize: Authorize
    ) -> Prepared | translation_pb2.TranslateResponse:
        """The script call for `request`, or the response when no Redis is needed (globally blocked caller).

        Raises InvalidArgument naming the field for malformed numbers; `authorize(called_number)` then raises
        PermissionDenied when the caller may not translate that (well-formed) number.
        """
        called = validate_called(request.called_number)
        authorize(called)
        caller = normalize_caller(request.calling_number)
        extension = validate_extension(request.extension)
        validate_call_id(request.call_id)
        blocked_tenants = ""
        entry = self.blocklist.lookup(caller)
        if entry is not None:
            now_ms = self.clock.now_ms()
            if entry.blocked_globally(now_ms):
                self._caller_blocked.inc()
                return translation_pb2.TranslateResponse(
                    decision=REJECT, reject_reason=CALLER_BLOCKED, call_id=request.call_id
                )
            blocked_tenants = entry.tenants_arg(now_ms)
        # The route table's keys from its one schema (numprotect.core.routes); the rate counters are ours.
        tag = "{" + called + "}"
        window, per_caller, per_binding = self._limits
        keys = (
            lock_key(called),
            caller_key(called, caller),
            axn_key(called),
            axe_marker_key(called),
            extension_key(called, extension),
            "np:rl:" + tag + ":c:" + caller,
        )
        args = (
            caller,
            "1" if extension else "0",
            window,
            per_caller,
            per_binding,
            blocked_tenants,
            "np:rl:" + tag + ":b:",
        )
        return Prepared(called, caller, request.call_id, keys, args)

    def recording_span(self) -> Span | None:
        """The current span when tracing is on and this call is sampled, else None (one check per call)."""
        if not self.traced:
            return None
        span = get_current_span()
        return span if span.is_recording() else None

    def call_span(self, traceparent: str, stream_span: Span | None) -> Span | None:
        """The `translation.call` span of a TranslateStream call whose `traceparent` is valid and sampled, else None.

        SERVER kind: it is the entry into translation of a trace that started in another process (the adapter's
        SIP INVITE span is its parent), like a unary Translate's server span; the stream's own SERVER span spans
        many calls of many traces, so the call's span links to it (when the stream is sampled) instead.
        """
        if self.tracer is None:
            return None
        parent = _PROPAGATOR.extract({"traceparent": traceparent})
        context = get_current_span(parent).get_span_context()
        if not context.is_valid or not context.trace_flags.sampled:
            return None
        span = self.tracer.start_span(
            CALL_SPAN,
            parent,
            SpanKind.SERVER,
            links=None if stream_span is None else (Link(stream_span.get_span_context()),),
            record_exception=False,  # messages may carry data; the status says what failed
            set_status_on_exception=False,
        )
        return span if span.is_recording() else None

    def finish(
        self, prepared: Prepared, reply: list[int | _TEXT], span: Span | None = None
    ) -> translation_pb2.TranslateResponse:
        """The response for the script's reply (see lua/translate.lua for its shape).

        `span`, the call's sampled span (`recording_span()`), gets the decision's attributes and its ids go into
        the call_ref. An unsampled call passes None: no attributes, and a call_ref without trace ids (a CDR must
        not link to a span that was never exported).
        """
        decision = int(reply[0])
        if decision == CONNECT:
            self._connected.inc()
            binding_id = as_text(reply[2])  # type: ignore[arg-type]
            tenant_id = as_text(reply[3])  # type: ignore[arg-type]
            unenforced = as_text(reply[6]) if len(reply) > 6 else None  # type: ignore[arg-type]
            if unenforced is not None:
                self.unenforced.add(unenforced)
            trace_id = span_id = 0
            if span is not None:
                trace_id, span_id = _annotate_span(span, prepared, CONNECT, binding_id, tenant_id)
                if unenforced is not None:
                    set_span_attributes(span, rate_limit_not_enforced=unenforced)
            return translation_pb2.TranslateResponse(
                decision=CONNECT,
                target_number=as_text(reply[4]),  # type: ignore[arg-type]
                display_number=prepared.called,
                binding_id=binding_id,
                tenant_id=tenant_id,
                recording_enabled=reply[5] in (b"1", "1"),
                call_ref=encode_call_ref(binding_id, prepared.called, self.clock.now_ms(), trace_id, span_id),
                call_id=prepared.call_id,
            )
        response = translation_pb2.TranslateResponse(decision=decision, call_id=prepared.call_id)  # type: ignore[arg-type]
        if decision == COLLECT_EXTENSION:
            self.decisions.collect_extension.inc()
        if span is not None:
            known = len(reply) >= 4
            _annotate_span(
                span,
                prepared,
                decision,
                as_text(reply[2]) if known else "",  # type: ignore[arg-type]
                as_text(reply[3]) if known else "",  # type: ignore[arg-type]
                int(reply[1]) if decision == REJECT else 0,  # type: ignore[arg-type]
            )
        if decision == REJECT:
            reason = int(reply[1])  # type: ignore[arg-type]
            self.decisions.rejected[reason].inc()
            response.reject_reason = reason  # type: ignore[assignment]
            if len(reply) >= 4:
                response.binding_id = as_text(reply[2])  # type: ignore[arg-type]
                response.tenant_id = as_text(reply[3])  # type: ignore[arg-type]
        return response


def _annotate_span(
    span: Span, prepared: Prepared, decision: int, binding_id: str, tenant_id: str, reject_reason: int = 0
) -> tuple[int, int]:
    """numprotect.* attributes (numbers masked) on the call's sampled span; its ids for the call_ref."""
    set_span_attributes(
        span,
        decision=translation_pb2.Decision.Name(decision),  # type: ignore[arg-type]
        reject_reason=translation_pb2.RejectReason.Name(reject_reason) if reject_reason else None,  # type: ignore[arg-type]
        tenant=tenant_id or None,
        binding_id=binding_id or None,
        virtual_number=mask(prepared.called),
        calling_number=mask(prepared.caller),
    )
    context = span.get_span_context()
    return context.trace_id, context.span_id


def too_many_requests(most: int) -> InvalidArgument:
    return InvalidArgument.field(
        "requests", f"at most {most} calls per message (NUMPROTECT_TRANSLATION_STREAM_MAX_REQUESTS)"
    )


def stream_error(error: DomainError) -> str:
    """The `error` text of a TranslateStreamResponse: "<STATUS_NAME>: <message>"; an UNAVAILABLE naming its cause
    appends what a unary call carries as google.rpc details: " [<ErrorInfo reason>; retry after <seconds> s]"."""
    if isinstance(error, Unavailable) and error.reason:
        return f"{error.code.name}: {error.message} [{error.reason}; retry after {error.retry_after:g} s]"
    return f"{error.code.name}: {error.message}"


class StreamBatch:
    """One batch of TranslateStream messages: answers for malformed, forbidden or blocked calls at once, scripts for
    the rest.

    A message carries one call (`request`) or several (`requests`, answered by one message with `responses`). Every
    error is per call (`error`: "<STATUS>: <message>", the stream stays open): a number of another carrier's block
    answers "PERMISSION_DENIED: ..." for that call only. A message with more than NUMPROTECT_TRANSLATION_STREAM_MAX_
    REQUESTS calls is answered by one message whose `error` is "INVALID_ARGUMENT: requests: ..." and no `responses`.

    A call whose `traceparent` is sampled gets its own span (`Translator.call_span`), made here and ended with its
    answer: it gets the decision's attributes and its ids go into the call's call_ref. Other calls use the stream's
    span (when sampled) as before; an empty `traceparent` costs one check.
    """

    def __init__(
        self,
        translator: Translator,
        messages: Sequence[translation_pb2.TranslateStreamRequest],
        authorize: Authorize,
    ) -> None:
        self.translator = translator
        self.authorize = authorize
        self.span = translator.recording_span()  # the stream's span, when it is sampled
        self.responses: list[translation_pb2.TranslateStreamResponse] = []
        # (answer, prepared call, the call's own span or None)
        self.pending: list[tuple[translation_pb2.TranslateStreamResponse, Prepared, Span | None]] = []
        most = translator.settings.stream_max_requests
        for message in messages:
            out = translation_pb2.TranslateStreamResponse()
            if len(message.requests) > most:
                out.error = stream_error(too_many_requests(most))
            elif message.requests:
                for request in message.requests:
                    self._add(out.responses.add(), request)
            else:
                self._add(out, message.request)
            self.responses.append(out)

    def _add(self, out: translation_pb2.TranslateStreamResponse, request: translation_pb2.TranslateRequest) -> None:
        out.call_id = request.call_id
        span = self.translator.call_span(request.traceparent, self.span) if request.traceparent else None
        try:
            prepared = self.translator.prepare(request, self.authorize)
        except DomainError as exc:
            out.error = stream_error(exc)
            if span is not None:
                _end_failed(span, out.error)
            return
        if isinstance(prepared, Prepared):
            self.pending.append((out, prepared, span))
        else:
            out.response.CopyFrom(prepared)
            if span is not None:
                span.end()

    @property
    def calls(self) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        return [(p.keys, p.args) for _, p, _ in self.pending]

    def fail(self, error: DomainError) -> list[translation_pb2.TranslateStreamResponse]:
        for out, _, span in self.pending:
            out.error = stream_error(error)
            if span is not None:
                _end_failed(span, out.error)
        return self.responses

    def complete(self, replies: Sequence[Any]) -> list[translation_pb2.TranslateStreamResponse]:
        """Fills in the scripts' replies (an exception instance answers its own call with an error)."""
        for (out, prepared, span), reply in zip(self.pending, replies, strict=True):
            if isinstance(reply, BaseException):
                error = domain_error(reply, "TranslateStream") or Unavailable("translation storage failed")
                out.error = stream_error(error)
                if span is not None:
                    _end_failed(span, out.error)
            elif span is None:
                out.response.CopyFrom(self.translator.finish(prepared, reply, self.span))
            else:
                out.response.CopyFrom(self.translator.finish(prepared, reply, span))
                span.end()
        return self.responses


def _end_failed(span: Span, error: str) -> None:
    """Ends a call's span with its stream error as an ERROR status (a number in it masked)."""
    span.set_status(Status(StatusCode.ERROR, mask_numbers(error)))
    span.end()
