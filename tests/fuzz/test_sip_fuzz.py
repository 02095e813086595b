"""The SIP adapter's parser and listener under random bytes and near-valid SIP messages (hypothesis, FUZZ profile).

Near-valid messages start from a valid INVITE, OPTIONS, ACK or CANCEL and change a few things (a line dropped,
doubled, folded or cut; a header's value, the method, the Request-URI, Via, CSeq or Content-Length replaced with
boundary values; bytes inserted), so most get past the first checks and reach the ones behind them.

What must hold: the parser raises nothing but `Malformed` or `ResponseReceived`; the handler raises nothing and
every answer it sends is a whole SIP response; the real listener (UDP and TCP on loopback, on uvloop as the
bootstrap runs it) never logs a handling failure nor leaves an exception to its loop, and still answers a valid
OPTIONS with 200 afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvloop
from fuzz.profiles import FUZZ
from hypothesis import given
from hypothesis import strategies as st

from numprotect.core.metrics import Metrics
from numprotect.services.sip.app import SipAdapter
from numprotect.services.sip.handler import SipHandler, SipMetrics
from numprotect.services.sip.message import (
    Malformed,
    ResponseReceived,
    StreamFramer,
    fast_cseq,
    fast_via,
    grammar_cseq,
    grammar_via,
    parse_request,
)
from numprotect.services.sip.settings import SipSettings
from numprotect.services.sip.transactions import TransactionTable
from numprotect.services.sip.transport import SipServer
from numprotect.translation.v1 import translation_pb2
from support.sip_requests import request, same_transaction, status

ANSWER_SECONDS = 5.0
MAX_BYTES = 4096
BOUNDARY_VALUES = (
    "",
    " ",
    "0",
    "-1",
    "4294967296",
    "99999999999999999999",
    "anonymous",
    "<sip:anonymous@anonymous.invalid>",
    "<tel:+86-138-0000-0001>",
    "sip:+86700100000000001;npdi;rn=1@h",
    "SIP/2.0/UDP [::1]:5060;branch=z9hG4bK;rport;received=",
    "SIP/2.0/TCP h;branch=",
    "SIP/2.0/UDP 127.0.0.1:99999;branch=z9hG4bKx",
    '"quoted, comma" <sip:a@b>;tag=x',
    "1 INVITE",
    "1 ACK",
    "2147483648 INVITE",
    "\u202e13800000001",
    "\uff17\uff10\uff10",
    "\x00",
    "a" * 3000,
    "<tel:+" + "1-" * 1500 + "x>",  # sipmessage's tel: grammar backtracks quadratically on this
    ";;;",
    "<<>>",
    ",,,",
)
METHODS = ("INVITE", "ACK", "CANCEL", "OPTIONS", "BYE", "REGISTER", "invite", "", "I\x00", "SIP/2.0")
URIS = (
    "sip:700100000000001@127.0.0.1",
    "tel:+86700100000000001",
    "sip:7001@h",
    "sips:700100000000001123456@h",
    "mailto:x@y",
    "sip:",
    "*",
    "sip:[::1]",
    "sip:700100000000001@h;" + "p;" * 500,
    "tel:+" + "1-" * 1500 + "x",
)


_INVITE = request(via_branch="z9hG4bK-fuzz-1", call_id="fuzz-1@127.0.0.1")
# Made once: the strategy must draw the same way on every replay.
BASES = (
    _INVITE,
    request("OPTIONS", via_branch="z9hG4bK-fuzz-2", call_id="fuzz-2@127.0.0.1"),
    same_transaction(_INVITE, "ACK"),
    same_transaction(_INVITE, "CANCEL"),
    request(
        body=b"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\n",
        transport="TCP",
        via_branch="z9hG4bK-fuzz-3",
        call_id="fuzz-3@127.0.0.1",
    ),
)


@st.composite
def near_valid(draw: st.DrawFn) -> bytes:
    """A valid request with one to three changes."""
    base = draw(st.sampled_from(BASES))
    head, _, body = base.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    for _ in range(draw(st.integers(1, 3))):
        change = draw(st.integers(0, 8))
        index = draw(st.integers(0, len(lines) - 1))
        value = draw(st.sampled_from(BOUNDARY_VALUES) | st.text(max_size=40)).encode("utf-8", "surrogatepass")
        if change == 0 and len(lines) > 1:
            del lines[index]
        elif change == 1:
            lines.insert(index, lines[index])
        elif change == 2:  # the value of a header replaced
            name = lines[index].split(b":", 1)[0]
            lines[index] = name + b": " + value
        elif change == 3:  # folded onto a continuation line
            cut = draw(st.integers(0, len(lines[index])))
            lines[index] = lines[index][:cut] + b"\r\n " + lines[index][cut:]
        elif change == 4:  # method or Request-URI
            parts = lines[0].split(b" ")
            if draw(st.booleans()):
                parts[0] = draw(st.sampled_from(METHODS)).encode()
            elif len(parts) > 1:
                parts[1] = draw(st.sampled_from(URIS)).encode()
            lines[0] = b" ".join(parts)
        elif change == 5:
            lines[index] = lines[index][: draw(st.integers(0, len(lines[index])))]
        elif change == 6:
            lines[index] = lines[index] + draw(st.binary(max_size=12))
        elif change == 7:
            lines.append(b"Content-Length: " + value)
        else:
            lines.insert(index, draw(st.sampled_from((b"", b" ", b"\t", b"v: ", b"l: 99", b"i:", b":x"))))
    end = b"\r\n\r\n" if draw(st.integers(0, 7)) else draw(st.sampled_from((b"\r\n", b"\n\n", b"")))
    return b"\r\n".join(lines) + end + body


MESSAGES = st.binary(max_size=MAX_BYTES) | near_valid()


class _Sink:
    def __init__(self, reliable: bool) -> None:
        self.reliable = reliable
        self.sent: list[bytes] = []

    def send(self, data: bytes, address: tuple[Any, ...]) -> None:
        self.sent.append(data)


class _Translator:
    up = True

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def translate(self, call: Any) -> translation_pb2.TranslateResponse:
        return translation_pb2.TranslateResponse(decision=translation_pb2.DECISION_REJECT)

    def submit(self, call: Any, done: Callable[[Any], None]) -> None:
        asyncio.ensure_future(self.translate(call)).add_done_callback(lambda answered: done(answered.result()))


def _handler(settings: SipSettings) -> SipHandler:
    metrics = SipMetrics(Metrics("sip", enabled=False))
    return SipHandler(settings, _Translator(), lambda *f: f, metrics, TransactionTable(1000))


SETTINGS = SipSettings.from_env(
    {"NUMPROTECT_SIP_EGRESS": "198.51.100.7", "NUMPROTECT_SIP_PORT": "0", "NUMPROTECT_SIP_MAX_MESSAGE_BYTES": "4096"}
)


# Near the fast Via reading's edge: hosts sipmessage takes or refuses (a digit ending a top label, an IPv4 look-alike,
# Unicode digits), ports, parameters with escapes, quotes, brackets, empty values, spaces.
VIA_HOSTS = (
    "127.0.0.1",
    "999.1.1.1",
    "1.2.3",
    "host",
    "host1",
    "h-1.example",
    "Host.Example.",
    "-h",
    "h-",
    "a..b",
    "[::1]",
    "\u0661.\u0662.\u0663.\u0664",
    "h_1",
    "",
)
VIA_TOKENS = st.sampled_from(("branch", "rport", "received", "Branch", "RPORT", "maddr", "ttl", "x", "%41", "b\u00e9"))
VIA_VALUES = st.sampled_from(("z9hG4bK-1", "z9hG4bK", "", "1.2.3.4", "[::1]", '"q"', "%41", "5060", "a b", "x;y"))
PORTS = st.sampled_from(("", ":5060", ":05061", ":0", ":99999", ":", ":\u0665", ":1234567"))


@st.composite
def via_values(draw: st.DrawFn) -> str:
    transport = draw(st.sampled_from(("UDP", "TCP", "udp", "TLS", "U-D", "")))
    separator = draw(st.sampled_from((" ", " ", " ", "  ", "\t", "")))
    value = f"SIP/2.0/{transport}{separator}{draw(st.sampled_from(VIA_HOSTS))}{draw(PORTS)}"
    for _ in range(draw(st.integers(0, 4))):
        name = draw(VIA_TOKENS | st.text(max_size=6))
        value += ";" + name if draw(st.booleans()) else f";{name}={draw(VIA_VALUES | st.text(max_size=6))}"
    return value


@FUZZ
@given(via_values() | st.text(max_size=60))
def test_the_fast_via_reading_agrees_with_sipmessage_wherever_it_applies(value: str) -> None:
    fast = fast_via(value)
    if fast is not None:
        assert fast == grammar_via(value), value


@FUZZ
@given(
    st.builds(
        "{}{}{}".format,
        st.sampled_from(("1", "01", "2147483648", "99999999999", "\u0661", "", "-1")),
        st.sampled_from((" ", "  ", "\t", "")),
        st.sampled_from(("INVITE", "ACK", "invite", "IN-VITE", "", "INVITE ", "\u00c9")),
    )
    | st.text(max_size=20)
)
def test_the_fast_cseq_reading_agrees_with_sipmessage_wherever_it_applies(value: str) -> None:
    fast = fast_cseq(value)
    if fast is not None:
        assert fast == grammar_cseq(value), value


@FUZZ
@given(MESSAGES, st.booleans())
def test_parser_raises_only_its_own_errors(data: bytes, stream: bool) -> None:
    with contextlib.suppress(Malformed, ResponseReceived):
        parse_request(data, stream=stream)


@FUZZ
@given(st.lists(MESSAGES | st.sampled_from((b"\r\n", b"\r\n\r\n")), max_size=4), st.integers(1, 64))
def test_framer_and_handler_never_raise_and_answer_whole_responses(messages: list[bytes], chunk: int) -> None:
    async def run() -> list[bytes]:
        handler = _handler(SETTINGS)
        sink = _Sink(reliable=True)
        framer = StreamFramer(SETTINGS.max_message_bytes)
        stream = b"".join(messages)
        for start in range(0, len(stream), chunk):
            framed = framer.feed(stream[start : start + chunk])
            for message in framed.messages:
                handler.handle(message, sink, ("127.0.0.1", 5061), "tcp")
            if framed.error:
                break
        for message in messages:
            handler.handle(message, _Sink(reliable=False), ("127.0.0.1", 5061), "udp")
        await asyncio.sleep(0)
        await handler.drain(1.0)
        return sink.sent

    for answer in asyncio.run(run()):
        assert answer.startswith(b"SIP/2.0 ") and answer.endswith(b"\r\n\r\n")
        assert 100 <= status(answer) <= 699


class _Failures(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


class _Listener:
    """The real adapter's listeners on loopback, on a uvloop loop of their own thread."""

    def __init__(self, failures: _Failures) -> None:
        self.failures = failures
        self.loop = uvloop.new_event_loop()
        self.loop_errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, context: self.loop_errors.append(context))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.adapter = self._call(self._start())

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(ANSWER_SECONDS * 2)

    async def _start(self) -> SipAdapter:
        handler = _handler(SETTINGS)
        metrics = SipMetrics(Metrics("sip", enabled=False))
        adapter = SipAdapter(SETTINGS, handler, SipServer(SETTINGS, handler, metrics), _Translator())
        await adapter.start()
        return adapter

    def stop(self) -> None:
        self._call(self.adapter.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(ANSWER_SECONDS)
        self.loop.close()


@pytest.fixture(scope="module")
def listener() -> Iterator[_Listener]:
    failures = _Failures()
    logging.getLogger("numprotect.services.sip").addHandler(failures)
    running = _Listener(failures)
    try:
        yield running
    finally:
        running.stop()
        logging.getLogger("numprotect.services.sip").removeHandler(failures)


def _options_answered(port: int) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(ANSWER_SECONDS)
        sock.sendto(request("OPTIONS"), ("127.0.0.1", port))
        while True:
            answer = sock.recv(65535)
            if b"CSeq: 1 OPTIONS" in answer:
                return status(answer)


def test_udp_listener_survives_and_still_answers(listener: _Listener) -> None:
    @FUZZ
    @given(MESSAGES)
    def send(data: bytes) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(data[:MAX_BYTES] or b"\x00", ("127.0.0.1", listener.adapter.port))

    send()
    _assert_answers_and_never_failed(listener)


def test_tcp_listener_survives_and_still_answers(listener: _Listener) -> None:
    @FUZZ
    @given(st.lists(MESSAGES, min_size=1, max_size=3))
    def send(messages: list[bytes]) -> None:
        with socket.create_connection(("127.0.0.1", listener.adapter.port), timeout=ANSWER_SECONDS) as sock:
            try:
                for message in messages:
                    sock.sendall(message)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the listener closed the connection after a message it refused: what it should do

    send()
    _assert_answers_and_never_failed(listener)


def _assert_answers_and_never_failed(listener: _Listener) -> None:
    assert _options_answered(listener.adapter.port) == 200
    assert listener.loop_errors == []
    assert listener.failures.records == []
