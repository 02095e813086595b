"""SIP requests from bytes: TCP framing by Content-Length, header unfolding, the fields a redirect server reads.

The start line and the header lines are split here (sipmessage's `Message.parse` neither unfolds folded headers
nor lets a Request-URI of another scheme through for a 416, and its header store is a list searched per header);
the grammar of each value a decision rests on (URI, Via, CSeq, From/To/P-Asserted-Identity addresses) is
sipmessage's. Every sipmessage call is wrapped: whatever it raises on bad input becomes `Malformed`, never an
exception out of the listener.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sipmessage import Address, CSeq, Via, grammar
from sipmessage.message import COMPACT_FORMS

SIP_VERSION = "SIP/2.0"
# RFC 3261 section 8.1.1.7: a branch starting with the magic cookie identifies the transaction on its own.
MAGIC_COOKIE = "z9hG4bK"
_HEAD_END = b"\r\n\r\n"
# The longest top Via, and URI or address, handed to sipmessage's grammar: its time grows faster than the length
# (its tel: pattern backtracks quadratically: a 16-KB tel: URI took 6 s, 256 characters 2 ms). Real ones are ~100.
MAX_VIA_CHARS = 512
MAX_GRAMMAR_CHARS = 128
# The method token (RFC 3261 section 25.1).
_TOKEN = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+", re.ASCII)
# Content-Length in a message head, before it is parsed (TCP framing).
_CONTENT_LENGTH = re.compile(rb"^(?:content-length|l)[ \t]*:[ \t]*([^\r\n]*?)[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)
_RPORT = re.compile(r";\s*rport(?=\s*(?:;|$))", re.IGNORECASE)
# A received parameter already in a Via (a response names the packet's source once, RFC 3261 section 18.2.1).
_RECEIVED = re.compile(r";\s*received\s*=[^;]*", re.IGNORECASE)
# RFC 3261's via-received is an unbracketed IPv6address, which sipmessage's generic-param grammar cannot read:
# bracketed before it reads the Via (the Via's text, copied into responses, stays as received).
_BARE_IPV6_RECEIVED = re.compile(r"(;\s*received\s*=\s*)([0-9A-Fa-f]*:[0-9A-Fa-f:.]*)(?=\s*(?:;|$))", re.IGNORECASE)
# The common written forms of a top Via and a CSeq, read without sipmessage's general grammar (a third of a
# request's parsing): sipmessage's own host, port and token patterns, no whitespace but the one space, parameters
# plain tokens without escapes. A value of any other form goes through sipmessage; both readings agree wherever
# this one applies (fuzzed side by side: tests/fuzz/test_sip_fuzz.py).
_FAST_VIA = re.compile(
    f"SIP/2\\.0/{grammar.TOKEN} (?P<host>(?:{grammar.HOSTNAME})|{grammar.IPV4ADDRESS})(?::(?P<port>{grammar.PORT}))?"
    f"(?P<parameters>(?:;{grammar.TOKEN}(?:={grammar.TOKEN})?)*)"
)
_FAST_CSEQ = re.compile(r"([0-9]{1,10}) ([A-Za-z]+)", re.ASCII)
# Lower-case long names of the compact forms (sipmessage's table).
_COMPACT = {short: long.lower() for short, long in COMPACT_FORMS.items()}
# The written forms of the headers switches send, to their lower-case long names (a dict look-up per header line
# instead of normalising each name); any other name goes through `_header_name`.
_COMMON_NAMES = {
    written: long.lower()
    for long in (
        "Via",
        "From",
        "To",
        "Call-ID",
        "CSeq",
        "Contact",
        "Max-Forwards",
        "Content-Length",
        "Content-Type",
        "P-Asserted-Identity",
        "User-Agent",
        "Allow",
        "Supported",
        "Route",
        "Record-Route",
        "Expires",
        "Accept",
    )
    for written in (long, long.lower(), long.upper(), long.title())
}
_COMMON_NAMES.update({short: long for short, long in _COMPACT.items()})
_COMMON_NAMES.update({short.upper(): long for short, long in _COMPACT.items()})
_REQUIRED = (("via", "Missing Via"), ("call-id", "Missing Call-ID"), ("cseq", "Missing CSeq"))
_REQUIRED_ADDRESSES = (("from", "From"), ("to", "To"))


class Malformed(Exception):
    """A message that cannot be handled. `reason` names the problem (the 400's reason phrase); `request`, when
    set, is what was read of it, enough to address a response (its top Via parsed)."""

    def __init__(self, reason: str, request: Request | None = None, *, code: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.request = request
        self.code = code


@dataclass(slots=True)
class TopVia:
    """The top Via as the adapter reads it: sent-by host and port, and its parameters (names as written; a
    repeated one: the last)."""

    host: str
    port: int | None
    parameters: dict[str, str | None]


class ResponseReceived(Exception):
    """The message is a response: a redirect server sends no requests, so it is no one's answer (dropped)."""


@dataclass(slots=True)
class Request:
    """One SIP request. Header names are lower-case long forms; each value is unfolded and stripped."""

    method: str
    uri: str
    headers: dict[str, list[str]]
    body: bytes
    # The top Via, parsed, and its text; the Via values after it, as received (copied into responses).
    top_via: TopVia
    top_via_text: str
    other_vias: list[str]
    call_id: str
    cseq_number: int
    cseq_method: str
    # responses.render's copy of the headers every response repeats, with the source address it was made for.
    copied: tuple[Any, ...] | None = None

    def header(self, name: str) -> str | None:
        """The first value of `name` (lower-case long form), or None."""
        values = self.headers.get(name)
        return values[0] if values else None

    @property
    def branch(self) -> str:
        return self.top_via.parameters.get("branch") or ""

    @property
    def sent_by(self) -> str:
        via = self.top_via
        return f"{via.host}:{via.port}" if via.port is not None else via.host

    def response_vias(self, source_host: str, source_port: int) -> list[str]:
        """The Via values of a response: the top one with `received` when the packet came from another address
        than its sent-by, or when rport was asked (RFC 3581, then `rport=<source port>` too), in place of any
        received the request carried; the others as received."""
        top = self.top_via_text
        rport = "rport" in self.top_via.parameters and self.top_via.parameters["rport"] is None
        if rport:
            top = _RPORT.sub(f";rport={source_port}", top, count=1)
        if rport or self.top_via.host.strip("[]") != source_host:
            if "received" in top.lower():
                top = _RECEIVED.sub("", top)
            top += f";received={source_host}"
        return [top, *self.other_vias]


def unfold(head: str) -> list[str]:
    """The head's lines with folded continuation lines (starting with a space or tab) joined to the line above
    (RFC 3261 section 7.3.1: folding is equivalent to one space)."""
    if "\r\n " not in head and "\r\n\t" not in head:
        return head.split("\r\n")
    lines: list[str] = []
    for line in head.split("\r\n"):
        if line[:1] in (" ", "\t") and lines:
            lines[-1] = lines[-1].rstrip() + " " + line.strip()
        else:
            lines.append(line)
    return lines


def parse_request(data: bytes, *, stream: bool = False) -> Request:
    """The request in `data` (one UDP datagram, or one message framed from a TCP stream). Raises
    `ResponseReceived` for a response and `Malformed` for anything else it cannot use. `stream`: the message
    came over TCP, where Content-Length is required (RFC 3261 section 18.3)."""
    end = data.find(_HEAD_END)
    if end < 0:
        raise Malformed("No end of headers")
    try:
        head = data[:end].decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed("Headers are not UTF-8") from None
    crlf = head.count("\r\n")
    if head.count("\r") != crlf or head.count("\n") != crlf:  # a bare CR or LF (lines end with CRLF only)
        raise Malformed("Bad line ending")
    body = data[end + 4 :]
    lines = unfold(head)
    start = lines[0]
    if start.startswith("SIP/"):
        raise ResponseReceived
    parts = start.split(" ")
    headers: dict[str, list[str]] = {}
    bad_header = ""
    for line in lines[1:]:
        raw_name, colon, value = line.partition(":")
        name = _COMMON_NAMES.get(raw_name) or _header_name(raw_name)
        if not colon or not name:
            bad_header = bad_header or "Bad header line"
            continue
        value = value.strip()
        if name == "via":
            # Via values are comma-separated (no comma is valid inside one, quoted parameters aside).
            headers.setdefault(name, []).extend(v.strip() for v in value.split(","))
        else:
            headers.setdefault(name, []).append(value)
    request = _addressable(headers, parts)
    problem = bad_header or _check(request, parts, headers, stream)
    if problem:
        raise Malformed(problem, request, code=505 if problem == "Version Not Supported" else 400)
    length = headers.get("content-length")
    if length is not None:
        declared = _content_length(length)
        if declared is None or declared > len(body):
            raise Malformed("Bad Content-Length", request)
        body = body[:declared]  # RFC 3261 section 18.3: bytes past Content-Length are discarded
    request.body = body
    return request


def _header_name(raw: str) -> str:
    """A header name's lower-case long form, or "" when it is no token."""
    name = raw.strip().lower()
    if not name or not _TOKEN.fullmatch(name):
        return ""
    return _COMPACT.get(name, name)


def _addressable(headers: dict[str, list[str]], parts: list[str]) -> Request:
    """A `Request` from what is needed to answer at all (a parseable top Via), else Malformed without one."""
    vias = headers.get("via")
    if not vias or not vias[0]:
        raise Malformed("Missing Via")
    if len(vias[0]) > MAX_VIA_CHARS:
        raise Malformed("Bad Via")
    top = read_via(vias[0])
    if top is None:
        raise Malformed("Bad Via")
    method = parts[0] if parts and _TOKEN.fullmatch(parts[0]) else ""
    call_ids = headers.get("call-id")
    number, cseq_method = -1, ""
    cseqs = headers.get("cseq")
    if cseqs:
        number, cseq_method = read_cseq(cseqs[0])
    return Request(
        method=method,
        uri=parts[1] if len(parts) > 1 else "",
        headers=headers,
        body=b"",
        top_via=top,
        top_via_text=vias[0],
        other_vias=vias[1:],
        call_id=call_ids[0] if call_ids else "",
        cseq_number=number,
        cseq_method=cseq_method,
    )


def read_via(value: str) -> TopVia | None:
    """A Via value's sent-by and parameters, or None when it is not a Via."""
    fast = fast_via(value)
    if fast is not None:
        return fast
    return grammar_via(value)


def fast_via(value: str) -> TopVia | None:
    """The common form of a Via value read directly, or None for any other form (then: `grammar_via`)."""
    match = _FAST_VIA.match(value)
    if match is None or match.end() != len(value) or "%" in value:
        return None
    port, raw = match["port"], match["parameters"]
    parameters: dict[str, str | None] = {}
    if raw:
        for item in raw[1:].split(";"):
            name, equals, parameter = item.partition("=")
            parameters[name] = parameter if equals else None
    return TopVia(match["host"], int(port) if port else None, parameters)


def grammar_via(value: str) -> TopVia | None:
    """A Via value read by sipmessage's grammar, or None when it is not one."""
    try:
        via = Via.parse(_BARE_IPV6_RECEIVED.sub(r"\1[\2]", value))
    except Exception:
        return None
    return TopVia(via.host, via.port, dict(via.parameters))


def read_cseq(value: str) -> tuple[int, str]:
    """A CSeq value's number and method, or (-1, "") when it is not one."""
    fast = fast_cseq(value)
    return fast if fast is not None else grammar_cseq(value)


def fast_cseq(value: str) -> tuple[int, str] | None:
    """The common form of a CSeq value (`1 INVITE`) read directly, or None for any other form."""
    match = _FAST_CSEQ.fullmatch(value)
    return (int(match[1]), match[2]) if match is not None else None


def grammar_cseq(value: str) -> tuple[int, str]:
    try:
        cseq = CSeq.parse(value)
    except Exception:
        return -1, ""
    return cseq.sequence, cseq.method


def _check(request: Request, parts: list[str], headers: dict[str, list[str]], stream: bool) -> str:
    """What is wrong with the request (a 400's reason phrase), or ""."""
    if len(parts) != 3 or not request.method or not request.uri:
        return "Bad Request-Line"
    if parts[2] != SIP_VERSION:
        return "Version Not Supported"
    for name, missing in _REQUIRED:
        if not headers.get(name) or not headers[name][0]:
            return missing
    if request.cseq_number < 0 or request.cseq_number >= 2**31:
        return "Bad CSeq"
    if request.cseq_method != request.method:
        return "CSeq Method Mismatch"
    for name, label in _REQUIRED_ADDRESSES:
        # Present is enough: their URIs may be of any scheme (RFC 3261 absoluteURI), and are read only when used.
        values = headers.get(name)
        if not values or not values[0]:
            return f"Missing {label}"
    if stream and "content-length" not in headers:
        return "Missing Content-Length"
    return ""


def _content_length(values: list[str]) -> int | None:
    raw = values[0]
    if not raw.isdigit() or not raw.isascii() or len(raw) > 9:
        return None
    return int(raw)


def parse_address(value: str) -> Address | None:
    """A From/To/P-Asserted-Identity value, or None when sipmessage cannot read it (or it is too long to try)."""
    if len(value) > MAX_GRAMMAR_CHARS:
        return None
    try:
        return Address.parse(value)
    except Exception:
        return None


def tag_of(value: str) -> str:
    """The `tag` parameter of a From or To value ("" when none or unreadable)."""
    address = parse_address(value)
    if address is None:
        return ""
    return address.parameters.get("tag") or ""


@dataclass(slots=True)
class Framed:
    """What the TCP framer found: whole messages, keep-alive pings to answer, or a problem ending the
    connection (`error`: the reason; `error_code` 400 or 513; `error_head`: the message head, if one was read)."""

    messages: list[bytes]
    pings: int = 0
    error: str = ""
    error_code: int = 0
    error_head: bytes = b""


class StreamFramer:
    """Splits a TCP byte stream into SIP messages by Content-Length (RFC 3261 section 18.3). Blank lines between
    messages are skipped; a double CRLF where a message would start is a keep-alive ping (RFC 5626 section 4.4.1),
    answered by the caller with one CRLF."""

    __slots__ = ("_buffer", "_max")

    def __init__(self, max_message_bytes: int) -> None:
        self._buffer = bytearray()
        self._max = max_message_bytes

    @property
    def pending(self) -> bool:
        """Part of a message (or of a keep-alive) has arrived and waits for the rest."""
        return bool(self._buffer)

    def feed(self, data: bytes) -> Framed:
        buffer = self._buffer
        buffer += data
        framed = Framed([])
        while buffer:
            if buffer.startswith(b"\r\n\r\n"):
                framed.pings += 1
                del buffer[:4]
                continue
            if buffer.startswith(b"\r\n"):
                if len(buffer) < 4 and b"\r\n\r\n".startswith(bytes(buffer)):
                    break  # maybe the start of a ping: wait for the rest
                del buffer[:2]
                continue
            end = buffer.find(_HEAD_END)
            if end < 0:
                if len(buffer) > self._max:
                    framed.error, framed.error_code = "Message Too Large", 513
                    framed.error_head = bytes(buffer[: self._max])
                    buffer.clear()
                break
            head = bytes(buffer[: end + 4])
            match = _CONTENT_LENGTH.search(head)
            if match is None:
                framed.error, framed.error_code, framed.error_head = "Missing Content-Length", 400, head
                buffer.clear()
                break
            raw = match.group(1)
            if not raw.isdigit() or len(raw) > 9:
                framed.error, framed.error_code, framed.error_head = "Bad Content-Length", 400, head
                buffer.clear()
                break
            total = end + 4 + int(raw)
            if total > self._max:
                framed.error, framed.error_code, framed.error_head = "Message Too Large", 513, head
                buffer.clear()
                break
            if len(buffer) < total:
                break
            framed.messages.append(bytes(buffer[:total]))
            del buffer[:total]
        return framed
