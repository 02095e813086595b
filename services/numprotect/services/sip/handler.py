"""The redirect server's request handling, whatever the transport: one message in, its responses out.

INVITE: 100 Trying at once, the translation over TranslateStream, then the final response (table in
responses.py); a retransmission is answered from the transaction, never translated again. ACK absorbed; CANCEL
200 + 487 while the INVITE is pending; OPTIONS 200 (503 while no translation stream is up, or draining); any
other method 405. Nothing a peer sends makes `handle` raise.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
from collections.abc import Callable, Hashable
from typing import Any, Protocol

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from numprotect.core import phone
from numprotect.core.identifiers import CALL_ID
from numprotect.core.metrics import LATENCY_BUCKETS, Metrics
from numprotect.services.sip.dialled import Refusal, calling, dialled
from numprotect.services.sip.errors import failure_summary
from numprotect.services.sip.message import Malformed, Request, ResponseReceived, parse_request, tag_of
from numprotect.services.sip.responses import ALLOW, Failure, Outcome, Renderer, reason, refusal, render, unavailable
from numprotect.services.sip.settings import SipSettings
from numprotect.services.sip.transactions import (
    Address,
    ServerTransaction,
    Sink,
    State,
    TransactionTable,
    transaction_key,
)
from numprotect.translation.v1 import translation_pb2

log = logging.getLogger(__name__)

# Methods counted under their own name; any other is "OTHER" (a scanner's made-up methods must not add series).
KNOWN_METHODS = frozenset(
    [
        "INVITE",
        "ACK",
        "CANCEL",
        "OPTIONS",
        "BYE",
        "REGISTER",
        "SUBSCRIBE",
        "NOTIFY",
        "PUBLISH",
        "INFO",
        "PRACK",
        "UPDATE",
        "MESSAGE",
        "REFER",
    ]
)
_OPTIONS_HEADERS = ALLOW + "Accept: application/sdp\r\n"
_NO_TRANSACTION = refusal(481, "Call/Transaction Does Not Exist", 0, "", "")
# An INVITE inside a dialog (To has a tag: a re-INVITE): a redirect server makes no dialogs, so none is recreated
# and no second translation is made for a call already redirected (RFC 3261 section 12.2.2).
_NO_DIALOG = refusal(481, "Call/Transaction Does Not Exist", 0, "", "NO_DIALOG")
_TERMINATED = refusal(487, "Request Terminated", 16, "cancelled", "CANCELLED")
_OK = refusal(200, "OK", 0, "", "")
_NOT_ALLOWED = Outcome(405, "Method Not Allowed", ALLOW, "")


class CallSetupFactory(Protocol):
    def __call__(
        self, calling_number: str, called_number: str, extension: str, call_id: str, traceparent: str
    ) -> Any: ...


class Translator(Protocol):
    """translation_client.TranslationClient as the handler uses it."""

    @property
    def up(self) -> bool: ...

    def submit(self, call: Any, done: Callable[[translation_pb2.TranslateResponse | Failure], None]) -> None: ...


class SipMetrics:
    """The adapter's metrics (docs/operations.md); labelled series are cached so a request costs no label lookup."""

    def __init__(self, metrics: Metrics) -> None:
        self._requests = metrics.counter(
            "numprotect_sip_requests", "SIP requests received (retransmissions not counted).", ("method", "transport")
        )
        self._responses = metrics.counter(
            "numprotect_sip_responses", "Final SIP responses sent (first sends only).", ("method", "code")
        )
        self._retransmissions = metrics.counter(
            "numprotect_sip_retransmissions", "Retransmitted SIP requests absorbed or answered.", ("method",)
        )
        self._dropped = metrics.counter(
            "numprotect_sip_dropped",
            "SIP messages not handled: malformed, too_large, not_allowed, response, overload, incomplete.",
            ("reason",),
        )
        self.invite_seconds = metrics.histogram(
            "numprotect_sip_invite_seconds", "INVITE received -> final response sent.", buckets=LATENCY_BUCKETS
        )
        self._translate_failures = metrics.counter(
            "numprotect_sip_translate_failures", "Translations that failed, by gRPC status.", ("status",)
        )
        self.transactions = metrics.gauge("numprotect_sip_transactions", "SIP server transactions held.")
        self.tcp_connections = metrics.gauge("numprotect_sip_tcp_connections", "Open SIP TCP connections.")
        self._cache: dict[tuple[str, ...], Any] = {}
        for drop_reason in ("malformed", "too_large", "not_allowed", "response", "overload", "incomplete"):
            self._child(self._dropped, drop_reason).inc(0)  # every reason's series exists from the start, at 0

    def _child(self, family: Any, *labels: str) -> Any:
        key = (str(id(family)), *labels)
        child = self._cache.get(key)
        if child is None:
            child = self._cache[key] = family.labels(*labels)
        return child

    def request(self, method: str, transport: str) -> None:
        self._child(self._requests, method, transport).inc()

    def response(self, method: str, code: int) -> None:
        self._child(self._responses, method, str(code)).inc()

    def retransmission(self, method: str) -> None:
        self._child(self._retransmissions, method).inc()

    def drop(self, reason: str) -> None:
        self._child(self._dropped, reason).inc()

    def translate_failure(self, status: str) -> None:
        self._child(self._translate_failures, status).inc()


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "OTHER"


class SipHandler:
    """Handles each request from a listener (`handle`); the translations in flight are callbacks of
    TranslationClient.submit (no task per INVITE)."""

    def __init__(
        self,
        settings: SipSettings,
        translator: Translator,
        call_setup: CallSetupFactory,
        metrics: SipMetrics,
        table: TransactionTable,
        *,
        tracer: trace.Tracer | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._settings = settings
        self._translator = translator
        self._call_setup = call_setup
        self._metrics = metrics
        self._table = table
        self._tracer = tracer or trace.NoOpTracer()
        self._propagator = TraceContextTextMapPropagator()
        self._renderer = Renderer(settings)
        self._clock = clock
        # Translations asked and not yet answered (a callback each, no task: a task per INVITE cost ~10 us), and
        # what drain() waits on for them.
        self._pending = 0
        self._all_answered: asyncio.Future[None] | None = None
        # To tags: a per-process prefix and a counter (unique; a transaction's tag is fixed with its response).
        self._tag_prefix = os.urandom(4).hex()
        self._tags = itertools.count(1)
        self.draining = False

    @property
    def inflight(self) -> int:
        return self._pending

    @property
    def ready(self) -> bool:
        """Readiness: a translation stream is up and the adapter is not draining."""
        return self._translator.up and not self.draining

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def _tag(self) -> str:
        return f"{self._tag_prefix}{next(self._tags):x}"

    def handle(self, data: bytes, sink: Sink, address: Address, transport: str) -> bool:
        """Handles one message; False when it was malformed (a TCP listener then closes the connection)."""
        try:
            return self._handle(data, sink, address, transport)
        except Exception as exc:  # a bug must cost this one message, never the listener
            log.error("sip message handling failed", extra=failure_summary(exc))
            self._metrics.drop("malformed")
            return False

    def _handle(self, data: bytes, sink: Sink, address: Address, transport: str) -> bool:
        try:
            request = parse_request(data, stream=sink.reliable)
        except ResponseReceived:
            self._metrics.drop("response")
            return True
        except Malformed as malformed:
            self._metrics.drop("malformed")
            self.refuse_malformed(malformed, sink, address)
            return False
        method = request.method
        if method == "INVITE":
            self._invite(request, sink, address, transport)
        elif method == "ACK":
            self._ack(request, transport)
        elif method == "CANCEL":
            self._cancel(request, sink, address, transport)
        else:
            self._non_invite(request, sink, address, transport)
        return True

    def refuse_malformed(self, malformed: Malformed, sink: Sink, address: Address) -> None:
        """400 (or 505, 513) when the request can be answered at all (a readable top Via) and is no ACK."""
        request = malformed.request
        if request is None or request.method in ("ACK", ""):
            return
        sink.send(render(request, malformed.code, malformed.reason, "", address, self._tag()), address)
        self._metrics.response(method_label(request.method), malformed.code)

    # INVITE

    def _invite(self, request: Request, sink: Sink, address: Address, transport: str) -> None:
        table = self._table
        key = transaction_key(request, "INVITE")
        transaction = table.get(key)
        if transaction is not None:
            self._metrics.retransmission("INVITE")
            transaction.resend()
            return
        metrics = self._metrics
        metrics.request("INVITE", transport)
        if self.draining or table.full:
            if not self.draining:
                metrics.drop("overload")
            self._stateless(request, sink, address, unavailable(self._settings, "OVERLOAD"), "INVITE")
            return
        now = self._now()
        transaction = table.open(key, True, sink, address, request, now)
        span = self._tracer.start_span("SIP INVITE", kind=SpanKind.SERVER)
        transaction.span = span
        if span.is_recording():
            span.set_attribute("sip.method", "INVITE")
            span.set_attribute("network.transport", transport)
        required = _unsupported(request)
        if required is not None:
            self._finish(transaction, required, now)
            return
        if _in_dialog(request):
            self._finish(transaction, _NO_DIALOG, now)
            return
        target = dialled(request.uri)
        if isinstance(target, Refusal):
            self._finish(transaction, _refused(target, "INVALID_NUMBER"), now)
            return
        caller = calling(request.headers.get("p-asserted-identity"), request.header("from"))
        if span.is_recording():
            span.set_attribute("numprotect.called_number", phone.mask(target.called_number))
            if not isinstance(caller, Refusal):
                span.set_attribute("numprotect.calling_number", phone.mask(caller))
        if isinstance(caller, Refusal):
            self._finish(transaction, _refused(caller, "ANONYMOUS"), now)
            return
        transaction.trying = render(request, 100, "Trying", "", address)
        sink.send(transaction.trying, address)
        traceparent = ""
        if span.get_span_context().trace_flags.sampled:
            carrier: dict[str, str] = {}
            self._propagator.inject(carrier, context=trace.set_span_in_context(span))
            traceparent = carrier.get("traceparent", "")
        call_id = request.call_id
        if not CALL_ID.matches(call_id):
            # A legal SIP Call-ID beyond translation's rule (1-128 visible ASCII) must not refuse the call: it goes
            # without one (the call_ref in the 302 is what ties the call to its CDR).
            call_id = ""
        call = self._call_setup(caller, target.called_number, target.extension, call_id, traceparent)
        self._pending += 1
        self._translator.submit(call, functools.partial(self._translated, key, transaction, target.called_number))

    def _translated(
        self,
        key: Hashable,
        transaction: ServerTransaction,
        called_number: str,
        result: translation_pb2.TranslateResponse | Failure,
    ) -> None:
        """The translation's answer (or failure) for an INVITE: its final response, unless it was cancelled."""
        try:
            if not isinstance(result, translation_pb2.TranslateResponse):
                self._metrics.translate_failure(result.status)
            outcome = self._renderer.outcome(result, called_number)
        except Exception as exc:  # a bug still answers the switch
            log.error("sip translation failed", extra=failure_summary(exc))
            outcome = unavailable(self._settings, "INTERNAL")
        finally:
            self._pending -= 1
            if not self._pending and self._all_answered is not None and not self._all_answered.done():
                self._all_answered.set_result(None)
        if transaction.state is not State.PROCEEDING or self._table.get(key) is not transaction:
            return  # cancelled (487 sent) or dropped meanwhile: the answer comes too late
        try:
            self._finish(transaction, outcome, self._now())
        except Exception as exc:  # a loop callback: nothing above to catch it
            log.error("sip final response failed", extra=failure_summary(exc))

    def _finish(self, transaction: ServerTransaction, outcome: Outcome, now: float) -> None:
        """Sends an INVITE's final response, keeps it for retransmissions and ends the INVITE's span."""
        request = transaction.request
        if request is None:  # already answered
            return
        data = render(request, outcome.code, outcome.phrase, outcome.headers, transaction.address, self._tag())
        transaction.sink.send(data, transaction.address)
        self._table.complete(transaction, data, now)
        self._metrics.response("INVITE", outcome.code)
        self._metrics.invite_seconds.observe(now - transaction.started)
        span, transaction.span = transaction.span, None
        if span is not None:
            if span.is_recording():
                span.set_attribute("sip.response.status_code", outcome.code)
                if outcome.decision:
                    span.set_attribute("numprotect.decision", outcome.decision)
                if outcome.code >= 500:
                    span.set_status(Status(StatusCode.ERROR, outcome.decision))
            span.end()

    # ACK, CANCEL, the rest

    def _ack(self, request: Request, transport: str) -> None:
        transaction = self._table.get(transaction_key(request, "INVITE"))
        if transaction is None or transaction.state is State.PROCEEDING:
            return  # not an ACK of ours (we never send 2xx to an INVITE): nothing to do
        if transaction.state is State.CONFIRMED:
            self._metrics.retransmission("ACK")
            return
        self._metrics.request("ACK", transport)
        self._table.confirm(transaction, self._now())

    def _cancel(self, request: Request, sink: Sink, address: Address, transport: str) -> None:
        key = transaction_key(request, "CANCEL")
        own = self._table.get(key)
        if own is not None:
            self._metrics.retransmission("CANCEL")
            own.resend()
            return
        self._metrics.request("CANCEL", transport)
        invite = self._table.get(transaction_key(request, "INVITE"))
        if invite is None:
            self._respond(request, sink, address, key, _NO_TRANSACTION)
            return
        self._respond(request, sink, address, key, _OK)
        if invite.state is State.PROCEEDING:  # the translation's answer is discarded when it comes
            self._finish(invite, _TERMINATED, self._now())

    def _non_invite(self, request: Request, sink: Sink, address: Address, transport: str) -> None:
        method = method_label(request.method)
        key = transaction_key(request, request.method)
        transaction = self._table.get(key)
        if transaction is not None:
            self._metrics.retransmission(method)
            transaction.resend()
            return
        self._metrics.request(method, transport)
        required = _unsupported(request)
        if required is not None:
            outcome = required
        elif request.method == "OPTIONS":
            if self.ready:
                outcome = Outcome(200, "OK", _OPTIONS_HEADERS, "")
            else:  # the carrier's trunk monitoring sees this adapter down and fails over
                outcome = unavailable(self._settings, "UNAVAILABLE")
        else:
            outcome = _NOT_ALLOWED
        self._respond(request, sink, address, key, outcome)

    def _respond(self, request: Request, sink: Sink, address: Address, key: Hashable, outcome: Outcome) -> None:
        """A non-INVITE request's final response, kept (Timer J) to answer its retransmissions when there is room."""
        data = render(request, outcome.code, outcome.phrase, outcome.headers, address, self._tag())
        sink.send(data, address)
        self._metrics.response(method_label(request.method), outcome.code)
        # Kept only while the table is at most half full: a flood of OPTIONS must not leave INVITEs no room.
        if len(self._table) < self._table.limit // 2:
            now = self._now()
            self._table.complete(self._table.open(key, False, sink, address, request, now), data, now)

    def _stateless(self, request: Request, sink: Sink, address: Address, outcome: Outcome, method: str) -> None:
        sink.send(render(request, outcome.code, outcome.phrase, outcome.headers, address, self._tag()), address)
        self._metrics.response(method, outcome.code)

    # Shutdown

    def start_draining(self) -> None:
        """New INVITEs get 503 (and readiness turns false) from now on."""
        self.draining = True

    async def drain(self, wait_seconds: float) -> None:
        """New INVITEs get 503 from now on; waits (at most `wait_seconds`) for the translations in flight."""
        self.draining = True
        if self._pending:
            self._all_answered = asyncio.get_running_loop().create_future()
            await asyncio.wait((self._all_answered,), timeout=wait_seconds)

    def sweep(self) -> None:
        """The one periodic timer round: Timers G, H, I and J of every transaction."""
        self._table.sweep(self._now())
        self._metrics.transactions.set(len(self._table))


def _unsupported(request: Request) -> Outcome | None:
    """420 Bad Extension when the request requires an extension (RFC 3261 section 8.2.2.3): we support none."""
    required = request.headers.get("require")
    if not required:
        return None
    names = ", ".join(name.strip() for value in required for name in value.split(",") if name.strip())
    return Outcome(420, "Bad Extension", f"Unsupported: {names}\r\n" if names else "", "UNSUPPORTED_EXTENSION")


def _in_dialog(request: Request) -> bool:
    """Whether the request's To carries a tag (looked for after the URI, which may hold a `tag` of its own)."""
    to = request.header("to") or ""
    if "tag" not in to.lower().rpartition(">")[2]:
        return False
    return bool(tag_of(to))


def _refused(refusal_: Refusal, decision: str) -> Outcome:
    return Outcome(refusal_.code, refusal_.phrase, reason(refusal_.cause, refusal_.text), decision)
