"""Server transactions: the timers of the table (G, H, I, J with one sweeper) on an explicit clock, and the handler's
transaction rules (100 at once, retransmissions answered with the same bytes and no second translation, ACK
absorbed, CANCEL 200 + 487, OPTIONS, 405, 400, overload, draining) with a stand-in for the translation client."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from numprotect.core.metrics import Metrics
from numprotect.services.sip.handler import SipHandler, SipMetrics
from numprotect.services.sip.message import parse_request
from numprotect.services.sip.settings import SipSettings
from numprotect.services.sip.transactions import T1, T2, T4, TIMER_H, TIMER_J, State, TransactionTable, transaction_key
from numprotect.translation.v1 import translation_pb2
from support.sip_requests import header, request, same_transaction, status

SOURCE = ("127.0.0.1", 5061)
X = "700100000000001"
CONNECT = translation_pb2.TranslateResponse(
    decision=translation_pb2.DECISION_CONNECT,
    target_number="13900000002",
    display_number=X,
    call_ref="ref-1",
    recording_enabled=True,
)


def rejected(reason: translation_pb2.RejectReason.ValueType) -> translation_pb2.TranslateResponse:
    return translation_pb2.TranslateResponse(decision=translation_pb2.DECISION_REJECT, reject_reason=reason)


@dataclass
class Sink:
    reliable: bool = False
    sent: list[bytes] = field(default_factory=list)

    def send(self, data: bytes, address: tuple[Any, ...]) -> None:
        assert address == SOURCE
        self.sent.append(data)


@dataclass(frozen=True)
class Failure:
    status: str
    message: str = ""


def settings(**overrides: str) -> SipSettings:
    return SipSettings.from_env({"NUMPROTECT_SIP_EGRESS": "198.51.100.7:5070", **overrides})


def handler_with(translator: Any, *, limit: int = 1000, metrics: Metrics | None = None) -> SipHandler:
    return SipHandler(
        settings(),
        translator,
        lambda *fields: fields,
        SipMetrics(metrics or Metrics("sip", enabled=False)),
        TransactionTable(limit),
    )


async def settle(handler: SipHandler) -> None:
    for _ in range(5):
        await asyncio.sleep(0)


# --- the table's timers --------------------------------------------------------------------------------------


def _completed_invite(reliable: bool) -> tuple[TransactionTable, Sink, Any]:
    table = TransactionTable(10)
    sink = Sink(reliable=reliable)
    invite = parse_request(request())
    transaction = table.open(transaction_key(invite, "INVITE"), True, sink, SOURCE, invite, 0.0)
    table.complete(transaction, b"final", 0.0)
    return table, sink, transaction


def test_timer_g_doubles_up_to_t2_until_timer_h_over_udp() -> None:
    table, sink, _transaction = _completed_invite(reliable=False)
    sends = []
    now = 0.0
    while now <= TIMER_H + 1:
        now = round(now + 0.05, 2)
        if table.sweep(now):
            sends.append(now)
    assert sends[:5] == [T1, 3 * T1, 7 * T1, 15 * T1, 15 * T1 + T2]
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(sends)]
    assert max(gaps) == T2
    assert sends[-1] < TIMER_H
    assert sink.sent == [b"final"] * len(sends)
    assert len(table) == 0  # Timer H gave up waiting for the ACK


def test_tcp_final_is_not_retransmitted_and_ack_ends_the_transaction() -> None:
    table, sink, transaction = _completed_invite(reliable=True)
    assert table.sweep(TIMER_H - 0.1) == 0
    assert sink.sent == []
    table.confirm(transaction, 1.0)
    assert len(table) == 0  # Timer I is 0 over TCP


def test_ack_stops_retransmissions_and_timer_i_keeps_the_transaction_t4() -> None:
    table, sink, transaction = _completed_invite(reliable=False)
    table.confirm(transaction, 0.2)
    assert transaction.state is State.CONFIRMED
    assert table.sweep(0.2 + T4 - 0.01) == 0
    assert len(table) == 1
    table.sweep(0.2 + T4)
    assert len(table) == 0
    assert sink.sent == []


def test_non_invite_is_kept_timer_j_over_udp_and_not_at_all_over_tcp() -> None:
    options = parse_request(request("OPTIONS"))
    key = transaction_key(options, "OPTIONS")
    table = TransactionTable(10)
    table.complete(table.open(key, False, Sink(), SOURCE, options, 0.0), b"200", 0.0)
    table.sweep(TIMER_J - 0.01)
    assert table.get(key) is not None
    table.sweep(TIMER_J)
    assert table.get(key) is None
    table.complete(table.open(key, False, Sink(reliable=True), SOURCE, options, 0.0), b"200", 0.0)
    assert table.get(key) is None


def test_rfc2543_requests_are_matched_without_a_magic_cookie_branch() -> None:
    invite_bytes = request(via="SIP/2.0/UDP 127.0.0.1:5061;branch=old-style-1")
    invite = parse_request(invite_bytes)
    ack = parse_request(same_transaction(invite_bytes, "ACK"))
    assert transaction_key(invite, "INVITE") == transaction_key(ack, "INVITE")
    other = parse_request(request(via="SIP/2.0/UDP 127.0.0.1:5061;branch=old-style-1"))
    assert transaction_key(other, "INVITE") != transaction_key(invite, "INVITE")  # another Call-ID


# --- the handler's transactions ------------------------------------------------------------------------------


async def test_invite_gets_100_at_once_then_302_and_a_retransmission_the_same_bytes_without_translating(
    fake_translator: Any,
) -> None:
    translator = fake_translator(CONNECT)
    translator.release.clear()
    handler = handler_with(translator)
    sink = Sink()
    invite = request(caller="+86-138-0000-0001")
    assert handler.handle(invite, sink, SOURCE, "udp")
    assert [status(m) for m in sink.sent] == [100]
    handler.handle(invite, sink, SOURCE, "udp")  # while translating: 100 again
    assert [status(m) for m in sink.sent] == [100, 100]
    translator.release.set()
    await settle(handler)
    final = sink.sent[-1]
    assert status(final) == 302
    assert header(final, "Contact") == "<sip:13900000002@198.51.100.7:5070;user=phone>"
    assert header(final, "P-Asserted-Identity") == f"<sip:{X}@198.51.100.7:5070;user=phone>"
    assert header(final, "X-Numprotect-Call-Ref") == "ref-1"
    assert header(final, "X-Numprotect-Recording") == "on"
    assert ";tag=" in (header(final, "To") or "")
    handler.handle(invite, sink, SOURCE, "udp")
    assert sink.sent[-1] == final
    assert len(translator.calls) == 1
    assert translator.calls[0][:4] == ("13800000001", X, "", translator.calls[0][3])


async def test_ack_is_absorbed_and_stops_timer_g(fake_translator: Any) -> None:
    handler = handler_with(fake_translator(rejected(translation_pb2.REJECT_REASON_UNSPECIFIED)))
    sink = Sink()
    invite = request()
    handler.handle(invite, sink, SOURCE, "udp")
    await settle(handler)
    assert status(sink.sent[-1]) == 403
    sent = len(sink.sent)
    handler.handle(same_transaction(invite, "ACK"), sink, SOURCE, "udp")
    handler.handle(same_transaction(invite, "ACK"), sink, SOURCE, "udp")
    loop_now = asyncio.get_running_loop().time()
    handler._table.sweep(loop_now + 2 * T1)
    assert len(sink.sent) == sent  # no response to the ACK, no retransmission after it


async def test_cancel_while_translating_gets_200_then_487_and_the_late_answer_is_discarded(
    fake_translator: Any,
) -> None:
    translator = fake_translator(CONNECT)
    translator.release.clear()
    handler = handler_with(translator)
    sink = Sink()
    invite = request()
    handler.handle(invite, sink, SOURCE, "udp")
    cancel = same_transaction(invite, "CANCEL")
    handler.handle(cancel, sink, SOURCE, "udp")
    assert [status(m) for m in sink.sent] == [100, 200, 487]
    assert (header(sink.sent[1], "CSeq") or "").endswith("CANCEL")
    assert (header(sink.sent[2], "CSeq") or "").endswith("INVITE")
    translator.release.set()
    await settle(handler)
    assert [status(m) for m in sink.sent] == [100, 200, 487]
    handler.handle(cancel, sink, SOURCE, "udp")  # a retransmitted CANCEL: its 200 again
    assert sink.sent[-1] == sink.sent[1]


async def test_cancel_after_the_final_response_is_200_without_effect_and_unknown_is_481(fake_translator: Any) -> None:
    handler = handler_with(fake_translator(CONNECT))
    sink = Sink()
    invite = request()
    handler.handle(invite, sink, SOURCE, "udp")
    await settle(handler)
    handler.handle(same_transaction(invite, "CANCEL"), sink, SOURCE, "udp")
    assert [status(m) for m in sink.sent] == [100, 302, 200]
    handler.handle(request("CANCEL"), sink, SOURCE, "udp")
    assert status(sink.sent[-1]) == 481


async def test_options_200_or_503_when_translation_is_down_other_methods_405(fake_translator: Any) -> None:
    translator = fake_translator(CONNECT)
    handler = handler_with(translator)
    sink = Sink()
    handler.handle(request("OPTIONS"), sink, SOURCE, "udp")
    assert status(sink.sent[-1]) == 200
    assert header(sink.sent[-1], "Allow") == "INVITE, ACK, CANCEL, OPTIONS"
    translator.up = False
    handler.handle(request("OPTIONS"), sink, SOURCE, "udp")
    assert status(sink.sent[-1]) == 503
    assert header(sink.sent[-1], "Retry-After") == "5"
    handler.handle(request("BYE"), sink, SOURCE, "udp")
    assert status(sink.sent[-1]) == 405
    assert header(sink.sent[-1], "Allow") == "INVITE, ACK, CANCEL, OPTIONS"


async def test_refusals_before_translation_never_translate(fake_translator: Any) -> None:
    translator = fake_translator(CONNECT)
    handler = handler_with(translator)
    sink = Sink()
    cases = [
        (request(uri="sip:7001000@127.0.0.1"), 484),
        (request(uri="sip:13900000002@127.0.0.1"), 404),
        (request(uri="mailto:someone@example.com"), 416),
        (request(caller="anonymous"), 433),
        (request(asserted="<sip:anonymous@anonymous.invalid>", caller="anonymous"), 433),
    ]
    for message, code in cases:
        handler.handle(message, sink, SOURCE, "udp")
        assert status(sink.sent[-1]) == code, message
    assert translator.calls == []
    assert header(sink.sent[0], "Reason") == 'Q.850;cause=28;text="digits missing"'


@pytest.mark.parametrize(
    ("answer", "code", "cause"),
    [
        (translation_pb2.TranslateResponse(decision=translation_pb2.DECISION_COLLECT_EXTENSION), 484, 28),
        (rejected(translation_pb2.REJECT_REASON_NO_BINDING), 404, 1),
        (rejected(translation_pb2.REJECT_REASON_DIRECTION_NOT_ALLOWED), 403, 21),
        (rejected(translation_pb2.REJECT_REASON_CALLER_BLOCKED), 603, 21),
        (rejected(translation_pb2.REJECT_REASON_RATE_LIMITED), 486, 17),
        (rejected(translation_pb2.REJECT_REASON_NUMBER_LOCKED), 480, 20),
        (rejected(translation_pb2.REJECT_REASON_UNSPECIFIED), 403, 21),
        (Failure("INVALID_ARGUMENT"), 404, 1),
        (Failure("PERMISSION_DENIED"), 403, 21),
        (Failure("DEADLINE_EXCEEDED"), 503, 41),
        (Failure("UNAVAILABLE"), 503, 41),
        (Failure("UNAUTHENTICATED"), 503, 41),
    ],
)
async def test_translation_outcomes_map_to_the_response_table(
    answer: Any, code: int, cause: int, fake_translator: Any
) -> None:
    handler = handler_with(fake_translator(answer))
    sink = Sink()
    handler.handle(request(), sink, SOURCE, "udp")
    await settle(handler)
    final = sink.sent[-1]
    assert status(final) == code
    assert (header(final, "Reason") or "").startswith(f"Q.850;cause={cause};")
    assert (header(final, "Retry-After") is not None) == (code == 503)


async def test_overload_and_draining_answer_503_without_translating(fake_translator: Any) -> None:
    metrics = Metrics("sip")
    translator = fake_translator(CONNECT)
    translator.release.clear()
    handler = handler_with(translator, limit=1, metrics=metrics)
    sink = Sink()
    handler.handle(request(), sink, SOURCE, "udp")
    handler.handle(request(), sink, SOURCE, "udp")
    assert [status(m) for m in sink.sent] == [100, 503]
    assert metrics.registry.get_sample_value("numprotect_sip_dropped_total", {"reason": "overload"}) == 1
    translator.release.set()
    drained = asyncio.get_running_loop().create_task(handler.drain(1.0))
    await drained
    assert status(sink.sent[2]) == 302  # the one in flight finished
    handler.handle(request(), sink, SOURCE, "udp")
    assert status(sink.sent[-1]) == 503
    assert not handler.ready
    assert len(translator.calls) == 1


async def test_malformed_requests_get_400_naming_the_problem_or_are_dropped(fake_translator: Any) -> None:
    metrics = Metrics("sip")
    handler = handler_with(fake_translator(CONNECT), metrics=metrics)
    sink = Sink()
    assert not handler.handle(request(omit=("CSeq",)), sink, SOURCE, "udp")
    assert sink.sent[-1].startswith(b"SIP/2.0 400 Missing CSeq\r\n")
    assert not handler.handle(request(omit=("Via",)), sink, SOURCE, "udp")
    assert not handler.handle(b"\x00\xff garbage", sink, SOURCE, "udp")
    assert not handler.handle(request("ACK", omit=("CSeq",)), sink, SOURCE, "udp")  # never an answer to an ACK
    assert len(sink.sent) == 1
    assert handler.handle(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKx\r\n\r\n", sink, SOURCE, "udp")
    assert len(sink.sent) == 1
    assert metrics.registry.get_sample_value("numprotect_sip_dropped_total", {"reason": "malformed"}) == 4
    assert metrics.registry.get_sample_value("numprotect_sip_dropped_total", {"reason": "response"}) == 1


async def test_metrics_count_new_requests_final_responses_and_retransmissions(fake_translator: Any) -> None:
    metrics = Metrics("sip")
    handler = handler_with(fake_translator(CONNECT), metrics=metrics)
    sink = Sink()
    invite = request()
    handler.handle(invite, sink, SOURCE, "udp")
    await settle(handler)
    handler.handle(invite, sink, SOURCE, "udp")
    value = metrics.registry.get_sample_value
    assert value("numprotect_sip_requests_total", {"method": "INVITE", "transport": "udp"}) == 1
    assert value("numprotect_sip_responses_total", {"method": "INVITE", "code": "302"}) == 1
    assert value("numprotect_sip_retransmissions_total", {"method": "INVITE"}) == 1
    assert value("numprotect_sip_invite_seconds_count", {}) == 1


async def test_the_invite_span_is_the_translations_parent_with_masked_numbers(fake_translator: Any) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    translator = fake_translator(CONNECT)
    handler = SipHandler(
        settings(),
        translator,
        lambda *fields: fields,
        SipMetrics(Metrics("sip", enabled=False)),
        TransactionTable(10),
        tracer=provider.get_tracer("test"),
    )
    handler.handle(request(call_id="13800000001-call@10.0.0.1"), Sink(), SOURCE, "udp")
    await settle(handler)
    (span,) = exporter.get_finished_spans()
    assert span.name == "SIP INVITE"
    assert span.kind is SpanKind.SERVER
    attributes = dict(span.attributes or {})
    assert attributes["sip.response.status_code"] == 302
    assert attributes["numprotect.decision"] == "CONNECT"
    assert attributes["numprotect.called_number"] == "700********0001"
    assert attributes["numprotect.calling_number"] == "138****0001"
    assert attributes["network.transport"] == "udp"
    assert "13800000001" not in repr(attributes)
    traceparent = translator.calls[0][4]
    assert traceparent.startswith(f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-")
    assert int(traceparent[-2:], 16) & 1  # sampled


async def test_a_required_extension_gets_420_naming_it(fake_translator: Any) -> None:
    translator = fake_translator(CONNECT)
    handler = handler_with(translator)
    sink = Sink()
    handler.handle(request(extra="Require: 100rel, precondition\r\n"), sink, SOURCE, "udp")
    handler.handle(request("OPTIONS", extra="Require: foo\r\n"), sink, SOURCE, "udp")
    assert [status(m) for m in sink.sent] == [420, 420]
    assert header(sink.sent[0], "Unsupported") == "100rel, precondition"
    assert translator.calls == []


async def test_an_unexpected_error_is_logged_by_type_and_place_never_with_its_text(
    caplog: pytest.LogCaptureFixture, fake_translator: Any
) -> None:
    translator = fake_translator(CONNECT)

    def broken_submit(call: Any, done: Callable[[Any], None]) -> None:
        # A bug in the path: its exception text carries the dialled number, as a header value's error would.
        raise ValueError(f"bad number {call[1]}")

    translator.submit = broken_submit
    handler = handler_with(translator)
    sink = Sink()
    with caplog.at_level("ERROR", logger="numprotect.services.sip.handler"):
        assert handler.handle(request(), sink, SOURCE, "udp") is False
    [record] = [r for r in caplog.records if r.message == "sip message handling failed"]
    assert record.exc_info is None and record.error == "ValueError"  # type: ignore[attr-defined]
    assert "submit" in record.at  # type: ignore[attr-defined]
    assert X not in caplog.text and "bad number" not in caplog.text
