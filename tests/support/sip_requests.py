"""SIP requests as a switch sends them, for the adapter's unit, listener and fuzz tests."""

from __future__ import annotations

import itertools

_COUNTER = itertools.count(1)


def branch() -> str:
    """A new RFC 3261 branch (magic cookie first)."""
    return f"z9hG4bK-test-{next(_COUNTER)}"


def request(
    method: str = "INVITE",
    uri: str = "sip:700100000000001@127.0.0.1",
    *,
    via_branch: str | None = None,
    via: str | None = None,
    caller: str = "13800000001",
    asserted: str | None = None,
    call_id: str | None = None,
    cseq: int = 1,
    cseq_method: str | None = None,
    transport: str = "UDP",
    extra: str = "",
    body: bytes = b"",
    content_length: int | None = None,
    omit: tuple[str, ...] = (),
) -> bytes:
    """One request; `omit` leaves out headers by name ("Via", "CSeq", ...), `extra` adds raw header lines."""
    via_value = via or f"SIP/2.0/{transport} 127.0.0.1:5061;branch={via_branch or branch()};rport"
    headers = [
        ("Via", via_value),
        ("Max-Forwards", "70"),
        ("From", f"<sip:{caller}@127.0.0.1>;tag=caller-{next(_COUNTER)}"),
        ("To", f"<{uri}>"),
        ("Call-ID", call_id or f"call-{next(_COUNTER)}@127.0.0.1"),
        ("CSeq", f"{cseq} {cseq_method or method}"),
    ]
    if asserted is not None:
        headers.append(("P-Asserted-Identity", asserted))
    headers.append(("Content-Length", str(len(body) if content_length is None else content_length)))
    lines = [f"{method} {uri} SIP/2.0"] + [f"{name}: {value}" for name, value in headers if name not in omit]
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode() + body


def same_transaction(invite: bytes, method: str, *, to: str | None = None) -> bytes:
    """The ACK or CANCEL of an INVITE: its Via (branch), From, To (or `to`: an ACK carries the final response's
    To, tag included), Call-ID and CSeq number, `method` in CSeq."""
    head = invite.split(b"\r\n\r\n", 1)[0].decode()
    lines = head.split("\r\n")
    start = lines[0].split(" ")
    out = [f"{method} {start[1]} SIP/2.0"]
    for line in lines[1:]:
        name, _, value = line.partition(": ")
        if name == "CSeq":
            value = f"{value.split(' ')[0]} {method}"
        if name == "Content-Length":
            value = "0"
        if name == "To" and to is not None:
            value = to
        out.append(f"{name}: {value}")
    return ("\r\n".join(out) + "\r\n\r\n").encode()


def header(response: bytes, name: str) -> str | None:
    """The first value of header `name` in a response (case-insensitive), or None."""
    wanted = name.lower() + ":"
    for line in response.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")[1:]:
        if line.lower().startswith(wanted):
            return line.split(":", 1)[1].strip()
    return None


def status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])
