"""Malformed HTTP/2 and gRPC framing, written by hand with h2 over TLS to each real service process: truncated
frames, a gRPC length prefix longer than its body, the compressed flag without grpc-encoding, a body that is no
protobuf, a wrong content-type, no `te: trailers`, oversized headers, a thousand streams opened and reset at once,
garbage after (and instead of) the connection preface.

The server must end each such stream with a gRPC status, reset it, or close the connection (never hang, never
crash); afterwards the process still runs and answers SERVING. What each case got is printed (`-s`) and listed in
docs/reliability.md.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from fuzz.contracts import Rpc, all_rpcs
from fuzz.platform import Platform
from fuzz.requests import VALID
from google.protobuf.message import Message

from numprotect.core.identity.principal import Role
from support.tls import test_pki

# Per process, one unary RPC with a valid request and a role allowed to call it.
TARGETS = {
    "allocation": ("AllocationService.GetNumber", Role.TENANT),
    "binding": ("BindingService.GetBinding", Role.TENANT),
    "translation": ("TranslationService.Translate", Role.CARRIER),
    "cdr": ("CdrService.GetCdrStats", Role.TENANT),
    "events": ("EventService.GetEndpoint", Role.TENANT),
}
ANSWER_SECONDS = 5.0
RPC_BY_NAME = {rpc.name: rpc for rpc in all_rpcs()}


def grpc_frame(body: bytes, *, compressed: bool = False, declared: int | None = None) -> bytes:
    """A gRPC length-prefixed message: flag byte, 4-byte big-endian length (`declared` or the body's), body."""
    return struct.pack(">BI", 1 if compressed else 0, len(body) if declared is None else declared) + body


class RawH2:
    """One TLS connection speaking HTTP/2 through h2 with outbound checks off, plus raw writes."""

    def __init__(self, address: tuple[str, int], *, preface: bool = True) -> None:
        context = ssl.create_default_context(cafile=str(test_pki().ca_file))
        context.set_alpn_protocols(["h2"])
        raw = socket.create_connection(address, timeout=ANSWER_SECONDS)
        self.sock = context.wrap_socket(raw, server_hostname=address[0])
        config = h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8", validate_outbound_headers=False, normalize_outbound_headers=False
        )
        self.conn = h2.connection.H2Connection(config=config)
        # Literal header strings: hpack's pure-Python Huffman coder takes tens of seconds for a 256-KiB value.
        encode = self.conn.encoder.encode
        self.conn.encoder.encode = lambda headers, huffman=True: encode(headers, huffman=False)  # type: ignore[method-assign]
        if preface:
            self.conn.initiate_connection()
            self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, headers: list[tuple[str, str]], body: bytes | None, *, end: bool = True) -> int:
        stream_id: int = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, headers, end_stream=body is None and end)
        if body is not None:
            self.conn.send_data(stream_id, body, end_stream=end)
        self.flush()
        return stream_id

    def outcome(self, stream_id: int, seconds: float = ANSWER_SECONDS) -> str:
        """How the stream ended: "grpc-status N", "reset", "http STATUS", "goaway", "closed" or "no answer"."""
        self.sock.settimeout(seconds)
        deadline = time.monotonic() + seconds
        http_status = ""
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            except (ConnectionError, ssl.SSLError):
                return "closed"
            if not data:
                return "closed"
            try:
                events = self.conn.receive_data(data)
            except Exception as exc:  # the server sent what h2 calls a protocol error: a closed conversation
                return f"closed ({exc.__class__.__name__})"
            self.flush()
            for event in events:
                if isinstance(event, h2.events.ConnectionTerminated):
                    return f"goaway {event.error_code!r}"
                if getattr(event, "stream_id", None) != stream_id:
                    continue
                if isinstance(event, h2.events.StreamReset):
                    return f"reset {event.error_code!r}"
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    headers: dict[Any, Any] = dict(event.headers)  # str pairs: header_encoding is set
                    http_status = headers.get(":status", http_status)
                    if "grpc-status" in headers:
                        return f"grpc-status {headers['grpc-status']}"
                if isinstance(event, h2.events.StreamEnded):
                    return f"http {http_status}"
        return "no answer"

    def close(self) -> None:
        self.sock.close()


@dataclass(frozen=True)
class Target:
    address: tuple[str, int]
    path: str
    token: str
    request: bytes

    def headers(self, **replaced: str | None) -> list[tuple[str, str]]:
        """A gRPC request's headers; `replaced` sets (or, with None, drops) some (underscores for dashes)."""
        headers = {
            ":method": "POST",
            ":scheme": "https",
            ":path": self.path,
            ":authority": f"{self.address[0]}:{self.address[1]}",
            "content-type": "application/grpc",
            "te": "trailers",
            "authorization": f"Bearer {self.token}",
        }
        for name, value in replaced.items():
            key = name.replace("_", "-")
            if value is None:
                headers.pop(key, None)
            else:
                headers[key] = value
        return list(headers.items())


def _valid(t: Target, h: RawH2) -> str:
    return h.outcome(h.request(t.headers(), grpc_frame(t.request)))


def _length_prefix_longer_than_body(t: Target, h: RawH2) -> str:
    return h.outcome(h.request(t.headers(), grpc_frame(t.request, declared=len(t.request) + 100)))


def _compressed_flag_without_encoding(t: Target, h: RawH2) -> str:
    return h.outcome(h.request(t.headers(), grpc_frame(t.request, compressed=True)))


def _compressed_with_unknown_encoding(t: Target, h: RawH2) -> str:
    return h.outcome(h.request(t.headers(grpc_encoding="zstd-x"), grpc_frame(t.request, compressed=True)))


def _body_not_protobuf(t: Target, h: RawH2) -> str:
    return h.outcome(h.request(t.headers(), grpc_frame(b"\xff\xff\xff\xff\x0f")))


def _prefix_without_body(t: Target, h: RawH2) -> str:
    return h.outcome(h.request(t.headers(), b"\x00\x00"))


def _two_messages_to_a_unary(t: Target, h: RawH2) -> str:
    return h.outcome(h.request(t.headers(), grpc_frame(t.request) * 2))


def _wrong_content_type(t: Target, h: RawH2) -> str:
    return h.outcome(h.request(t.headers(content_type="text/html"), grpc_frame(t.request)))


def _missing_te_trailers(t: Target, h: RawH2) -> str:
    return h.outcome(h.request(t.headers(te=None), grpc_frame(t.request)))


def _get_instead_of_post(t: Target, h: RawH2) -> str:
    return h.outcome(h.request(t.headers(**{":method": "GET"}), None))


def _unknown_method_path(t: Target, h: RawH2) -> str:
    return h.outcome(h.request(t.headers(**{":path": "/numprotect.x.v1.Nope/Nothing"}), grpc_frame(b"")))


def _oversized_header(t: Target, h: RawH2) -> str:
    return h.outcome(h.request(t.headers(x_junk="j" * 256 * 1024), grpc_frame(t.request)))


def _many_headers(t: Target, h: RawH2) -> str:
    many = [(f"x-h{i}", "v" * 20) for i in range(5000)]
    return h.outcome(h.request(t.headers() + many, grpc_frame(t.request)))


def _dropped_mid_frame(h: RawH2, stream_id: int, frame_start: bytes) -> str:
    """Sends the start of a frame, then drops the connection: the server rightly waits for the rest until then (a
    frame cut short looks like a slow network), so what counts is that it survives the cut."""
    h.raw(frame_start)
    answered_early = h.outcome(stream_id, seconds=0.5)
    h.sock.close()
    return "dropped by the client" if answered_early == "no answer" else answered_early


def _truncated_data_frame(t: Target, h: RawH2) -> str:
    """HEADERS, then a DATA frame announcing 1,000 bytes of which 10 arrive."""
    stream_id = h.request(t.headers(), None, end=False)
    return _dropped_mid_frame(h, stream_id, _frame_header(1000, 0x0, 0x1, stream_id) + b"\x00" * 10)


def _truncated_headers_frame(t: Target, h: RawH2) -> str:
    """A HEADERS frame announcing 200 bytes of which 7 arrive."""
    return _dropped_mid_frame(h, 1, _frame_header(200, 0x1, 0x4, 1) + b"\x82\x86\x84abc")


def _frame_header(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    return struct.pack(">I", length)[1:] + bytes([kind, flags]) + struct.pack(">I", stream_id)


def _many_streams_opened_and_reset(t: Target, h: RawH2) -> str:
    """A thousand streams each opened and reset at once (the rapid-reset pattern), then one real call."""
    for i in range(1000):
        stream_id = h.conn.get_next_available_stream_id()
        h.conn.send_headers(stream_id, t.headers(), end_stream=False)
        h.conn.reset_stream(stream_id)
        if i % 100 == 99:
            h.flush()
    h.flush()
    return h.outcome(h.request(t.headers(), grpc_frame(t.request)))


def _garbage_after_preface(t: Target, h: RawH2) -> str:
    h.raw(b"\xde\xad\xbe\xef" * 64)
    return h.outcome(1)


def _http1_instead_of_preface(t: Target, h: RawH2) -> str:
    h.raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    return h.outcome(1)


CASES: dict[str, tuple[Callable[[Target, RawH2], str], bool]] = {
    # name: (case, whether it starts with the client preface)
    "valid_request": (_valid, True),
    "length_prefix_longer_than_body": (_length_prefix_longer_than_body, True),
    "compressed_flag_without_grpc_encoding": (_compressed_flag_without_encoding, True),
    "compressed_with_unknown_encoding": (_compressed_with_unknown_encoding, True),
    "body_not_protobuf": (_body_not_protobuf, True),
    "length_prefix_cut_short": (_prefix_without_body, True),
    "two_messages_to_a_unary_rpc": (_two_messages_to_a_unary, True),
    "wrong_content_type": (_wrong_content_type, True),
    "missing_te_trailers": (_missing_te_trailers, True),
    "get_instead_of_post": (_get_instead_of_post, True),
    "unknown_method": (_unknown_method_path, True),
    "oversized_header_256_kib": (_oversized_header, True),
    "five_thousand_headers": (_many_headers, True),
    "truncated_data_frame": (_truncated_data_frame, True),
    "truncated_headers_frame": (_truncated_headers_frame, True),
    "thousand_streams_opened_and_reset": (_many_streams_opened_and_reset, True),
    "garbage_after_preface": (_garbage_after_preface, True),
    "http1_instead_of_preface": (_http1_instead_of_preface, False),
}


def target(platform: Platform, process: str) -> Target:
    name, role = TARGETS[process]
    rpc: Rpc = RPC_BY_NAME[name]
    request: Message = VALID[name](platform)
    host, port = platform.processes[process].address.rsplit(":", 1)
    return Target((host, int(port)), rpc.path, platform.tokens[role], request.SerializeToString())


@pytest.mark.parametrize("process", list(TARGETS))
@pytest.mark.parametrize("case", list(CASES))
def test_malformed_framing_gets_a_status_or_a_closed_connection(platform: Platform, process: str, case: str) -> None:
    run, preface = CASES[case]
    connection = RawH2(target(platform, process).address, preface=preface)
    try:
        outcome = run(target(platform, process), connection)
    finally:
        connection.close()
    print(f"{process} {case}: {outcome}")
    if case == "valid_request":
        assert outcome == "grpc-status 0", outcome  # the raw client itself speaks gRPC correctly
    elif case == "body_not_protobuf":
        # Bytes that are no request message are the caller's error: INVALID_ARGUMENT, not UNKNOWN (2) or INTERNAL (13).
        assert outcome == "grpc-status 3", outcome
    elif case in ("length_prefix_longer_than_body", "length_prefix_cut_short"):
        # A unary call whose stream ends without a whole message: the call layer answers INVALID_ARGUMENT on grpc.aio
        # (alone, grpc.aio never answered it: "no answer"); grpcio's thread-pool server (translation) answers
        # UNIMPLEMENTED ("requires exactly one request message") itself, before the layer runs.
        assert outcome == ("grpc-status 12" if process == "translation" else "grpc-status 3"), outcome
    else:
        assert outcome != "no answer", f"{case}: neither a status nor a closed connection in {ANSWER_SECONDS} s"
    assert not platform.unhealthy(), platform.unhealthy()


def test_the_checks_see_a_stream_left_unanswered(platform: Platform) -> None:
    """The harness can fail: a request whose body never ends gets no answer, which the test above would refuse."""
    aim = target(platform, "cdr")
    connection = RawH2(aim.address)
    try:
        stream_id = connection.request(aim.headers(), None, end=False)  # headers, then nothing: the server waits
        assert connection.outcome(stream_id, seconds=1.0) == "no answer"
    finally:
        connection.close()
