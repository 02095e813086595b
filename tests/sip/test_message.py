"""SIP message handling: parsing (unfolding, compact forms, what is required), the Via of a response (received,
rport), rendering, and TCP framing by Content-Length with CRLF keep-alives."""

from __future__ import annotations

import pytest

from numprotect.services.sip.message import (
    Malformed,
    ResponseReceived,
    StreamFramer,
    TopVia,
    fast_cseq,
    fast_via,
    parse_request,
    read_cseq,
    read_via,
    unfold,
)
from numprotect.services.sip.responses import render
from support.sip_requests import header, request


def test_a_request_is_parsed_with_folded_and_compact_headers() -> None:
    raw = (
        b"INVITE sip:700100000000001@127.0.0.1 SIP/2.0\r\n"
        b"v: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK-a, SIP/2.0/UDP 10.0.0.2;branch=z9hG4bK-b\r\n"
        b"Via: SIP/2.0/TCP 10.0.0.3;branch=z9hG4bK-c\r\n"
        b"f: <sip:13800000001@10.0.0.1>\r\n"
        b"  ;tag=abc\r\n"
        b"t: <sip:700100000000001@127.0.0.1>\r\n"
        b"i: call-1\r\n"
        b"CSeq:   7\r\n\tINVITE\r\n"
        b"l: 4\r\n"
        b"\r\n"
        b"bodyEXTRA"
    )
    parsed = parse_request(raw)
    assert (parsed.method, parsed.uri, parsed.call_id) == ("INVITE", "sip:700100000000001@127.0.0.1", "call-1")
    assert (parsed.cseq_number, parsed.cseq_method) == (7, "INVITE")
    assert parsed.header("from") == "<sip:13800000001@10.0.0.1> ;tag=abc"
    assert parsed.branch == "z9hG4bK-a"
    assert parsed.sent_by == "10.0.0.1:5060"
    assert parsed.other_vias == ["SIP/2.0/UDP 10.0.0.2;branch=z9hG4bK-b", "SIP/2.0/TCP 10.0.0.3;branch=z9hG4bK-c"]
    assert parsed.body == b"body"  # bytes past Content-Length are dropped


def test_unfold_joins_continuation_lines() -> None:
    assert unfold("A: 1\r\n 2\r\n\t3\r\nB: 4") == ["A: 1 2 3", "B: 4"]


@pytest.mark.parametrize(
    ("omit", "reason"),
    [
        (("Call-ID",), "Missing Call-ID"),
        (("CSeq",), "Missing CSeq"),
        (("From",), "Missing From"),
        (("To",), "Missing To"),
    ],
)
def test_a_missing_required_header_is_named_and_the_request_still_answerable(
    omit: tuple[str, ...], reason: str
) -> None:
    with pytest.raises(Malformed) as caught:
        parse_request(request(omit=omit))
    assert caught.value.reason == reason
    assert caught.value.request is not None


@pytest.mark.parametrize(
    ("raw", "reason", "answerable"),
    [
        (request(omit=("Via",)), "Missing Via", False),
        (request(via="SIP/3.0/UDP nowhere"), "Bad Via", False),
        (b"INVITE sip:x@y SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKx", "No end of headers", False),
        (b"\xff\xfe\r\n\r\n", "Headers are not UTF-8", False),
        (request().replace(b"Max-Forwards: 70\r\n", b"Max-Forwards: 70\n"), "Bad line ending", False),
        (request(cseq_method="OPTIONS"), "CSeq Method Mismatch", True),
        (request().replace(b"CSeq: 1 INVITE", b"CSeq: x INVITE"), "Bad CSeq", True),
        (request().replace(b" SIP/2.0\r\n", b" SIP/3.0\r\n", 1), "Version Not Supported", True),
        (request(content_length=10), "Bad Content-Length", True),
        (request().replace(b"Max-Forwards: 70", b"Max-Forwards 70"), "Bad header line", True),
    ],
)
def test_malformed_requests_are_named(raw: bytes, reason: str, answerable: bool) -> None:
    with pytest.raises(Malformed) as caught:
        parse_request(raw)
    assert caught.value.reason == reason
    assert (caught.value.request is not None) == answerable


def test_a_response_is_told_apart() -> None:
    with pytest.raises(ResponseReceived):
        parse_request(b"SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKx\r\n\r\n")


def test_tcp_requires_content_length() -> None:
    with pytest.raises(Malformed, match="Missing Content-Length"):
        parse_request(request(omit=("Content-Length",)), stream=True)
    assert parse_request(request(omit=("Content-Length",))).body == b""  # UDP: the datagram ends the message


def test_response_copies_vias_from_to_call_id_cseq_and_adds_received_rport_and_tag() -> None:
    parsed = parse_request(
        request(via="SIP/2.0/UDP 10.0.0.1:5060;rport;branch=z9hG4bK-1, SIP/2.0/UDP 10.0.0.2;branch=z9hG4bK-2")
    )
    data = render(parsed, 404, "Not Found", 'Reason: Q.850;cause=1;text="no binding"\r\n', ("192.0.2.9", 40000), "t1")
    lines = data.decode().split("\r\n")
    assert lines[0] == "SIP/2.0 404 Not Found"
    assert lines[1] == "Via: SIP/2.0/UDP 10.0.0.1:5060;rport=40000;branch=z9hG4bK-1;received=192.0.2.9"
    assert lines[2] == "Via: SIP/2.0/UDP 10.0.0.2;branch=z9hG4bK-2"
    assert header(data, "To") == "<sip:700100000000001@127.0.0.1>;tag=t1"
    assert header(data, "Call-ID") == parsed.call_id
    assert header(data, "CSeq") == "1 INVITE"
    assert header(data, "Server") == "numprotect-sip"
    assert data.endswith(b"Content-Length: 0\r\n\r\n")


def test_received_only_when_the_source_differs_and_no_rport() -> None:
    parsed = parse_request(request(via="SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-1"))
    assert parsed.response_vias("127.0.0.1", 5061) == ["SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-1"]
    to_tagged = parse_request(request().replace(b"To: <sip:700100000000001@127.0.0.1>", b"To: <sip:x@y>;tag=theirs"))
    assert header(render(to_tagged, 481, "Gone", "", ("127.0.0.1", 1), "ours"), "To") == "<sip:x@y>;tag=theirs"


def test_framer_splits_by_content_length_across_chunks_and_answers_pings() -> None:
    framer = StreamFramer(4096)
    first = request(body=b"v=0\r\n", transport="TCP")
    second = request("OPTIONS", transport="TCP")
    stream = b"\r\n\r\n" + first + b"\r\n" + second
    messages: list[bytes] = []
    pings = 0
    for i in range(0, len(stream), 7):
        framed = framer.feed(stream[i : i + 7])
        assert not framed.error
        messages += framed.messages
        pings += framed.pings
    assert messages == [first, second]
    assert pings == 1


@pytest.mark.parametrize(
    ("data", "error", "code"),
    [
        (request(omit=("Content-Length",)), "Missing Content-Length", 400),
        (request().replace(b"Content-Length: 0", b"Content-Length: -1"), "Bad Content-Length", 400),
        (request(content_length=4000), "Message Too Large", 513),
        (b"INVITE sip:x@y SIP/2.0\r\nX: " + b"a" * 3000, "Message Too Large", 513),
    ],
)
def test_framer_refuses_what_it_cannot_frame(data: bytes, error: str, code: int) -> None:
    framed = StreamFramer(2048).feed(data)
    assert (framed.error, framed.error_code, framed.messages) == (error, code, [])


def test_an_overlong_top_via_is_refused_before_the_grammar() -> None:
    with pytest.raises(Malformed, match="Bad Via"):
        parse_request(request(via="SIP/2.0/UDP h;" + "a=b;" * 4000))


def test_common_via_and_cseq_forms_are_read_without_the_grammar() -> None:
    """SIPp's and the switches' usual forms take the direct reading (tests/fuzz checks it agrees with sipmessage);
    other forms go through sipmessage's grammar, with the same result type."""
    sipp = "SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-1234-1-0;rport"
    assert fast_via(sipp) == TopVia("127.0.0.1", 5061, {"branch": "z9hG4bK-1234-1-0", "rport": None}) == read_via(sipp)
    assert fast_via("SIP/2.0/TCP pbx.example;branch=z9hG4bKa;received=10.0.0.1") == TopVia(
        "pbx.example", None, {"branch": "z9hG4bKa", "received": "10.0.0.1"}
    )
    ipv6 = "SIP/2.0/TCP [::1]:5060;branch=z9hG4bKb"
    assert fast_via(ipv6) is None and read_via(ipv6) == TopVia("[::1]", 5060, {"branch": "z9hG4bKb"})
    spaced = "SIP/2.0/UDP h ; branch = x"
    assert fast_via(spaced) is None and read_via(spaced) == TopVia("h", None, {"branch": "x"})
    assert read_via("SIP/2.0/UDP h_1;branch=x") is None  # not a host: 400 Bad Via
    assert fast_cseq("7 INVITE") == (7, "INVITE") == read_cseq("7 INVITE")
    assert fast_cseq("7  INVITE") is None and read_cseq("7  INVITE") == (7, "INVITE")
    assert read_cseq("x INVITE") == (-1, "")
