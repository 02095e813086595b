"""The SIPp harness's parsers (support/sipp.py) on trace text as SIPp 3.6.1 writes it."""

from __future__ import annotations

from support.sipp import parse_messages, parse_stats, uri_user

TRACE = """----------------------------------------------- 2026-12-01 03:27:10.035038
UDP message sent (120 bytes):

INVITE sip:700100000000001@127.0.0.1:5060;user=phone SIP/2.0
v: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-1
From:
 <sip:13800000001@127.0.0.1>;tag=1
Call-ID: 1-1@127.0.0.1
CSeq: 1 INVITE
Content-Length: 0


----------------------------------------------- 2026-12-01 03:27:10.035308
UDP message received [90] bytes :

SIP/2.0 100 Trying
Call-ID: 1-1@127.0.0.1
CSeq: 1 INVITE

UDP message lost (recv).----------------------------------------------- 2026-12-01 03:27:10.537255
TCP message received [99] bytes :

SIP/2.0 302 Moved Temporarily
Call-ID: 1-1@127.0.0.1
CSeq: 1 INVITE
Contact: <sip:+8613900000002@198.51.100.7:5070;user=phone>

"""


def test_messages_are_split_with_their_time_direction_and_loss() -> None:
    invite, trying, redirect = parse_messages(TRACE)
    assert (invite.direction, invite.transport, invite.method, invite.lost) == ("sent", "UDP", "INVITE", False)
    assert invite.header("Via") == "SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-1"  # compact form
    assert invite.header("from") == "<sip:13800000001@127.0.0.1>;tag=1"  # folded line joined
    assert uri_user(invite.request_uri) == "700100000000001"
    assert (trying.status, trying.lost, trying.method) == (100, True, "INVITE")
    assert "lost" not in trying.text
    assert (redirect.status, redirect.reason_phrase, redirect.transport) == (302, "Moved Temporarily", "TCP")
    assert uri_user(redirect.header("Contact") or "") == "+8613900000002"
    assert round(redirect.at - invite.at, 6) == 0.502217


def test_the_last_statistics_row_is_read_by_column() -> None:
    stats = parse_stats("A;SuccessfulCall(C);FailedCall(C);\n1;0;0;\n2;5;1;\n")
    assert (stats["SuccessfulCall(C)"], stats["FailedCall(C)"]) == ("5", "1")
    assert parse_stats("") == {}
