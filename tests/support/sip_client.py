"""A minimal SIP client over UDP for tests that need one real call through the adapter (not the SIPp scenarios of
tests/sip): one request, its final response, and the ACK a non-2xx final response asks for (RFC 3261 17.1.1.3)."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from support.sip_requests import header, request, same_transaction, status


@dataclass(frozen=True)
class SipResponse:
    status: int
    text: str  # the whole response as received

    def header(self, name: str) -> str:
        """The first value of header `name` ("" when absent)."""
        return header(self.text.encode(), name) or ""


class SipClient:
    """One UDP socket on loopback talking to the adapter at 127.0.0.1:`port`."""

    def __init__(self, port: int, *, timeout: float = 5.0) -> None:
        self.port = port
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.local_port: int = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SipClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self, method: str, user: str, *, caller: str, call_id: str, branch: str, ack: bool = True
    ) -> SipResponse:
        """Sends `method` to sip:`user`@127.0.0.1 (sip:127.0.0.1 for no user) from `caller` and returns its final
        response (100 Trying and other provisional responses skipped); the request is sent again every 0.5 s (Timer
        A) until one arrives. A non-2xx final response to an INVITE is acknowledged unless `ack` is False (the same
        request again is then a retransmission of it)."""
        message = request(
            method,
            f"sip:{user}@127.0.0.1" if user else "sip:127.0.0.1",
            via=f"SIP/2.0/UDP 127.0.0.1:{self.local_port};branch={branch};rport",
            caller=caller,
            call_id=call_id,
            extra=f"Contact: <sip:{caller}@127.0.0.1:{self.local_port}>\r\n",
        )
        deadline = time.monotonic() + self.timeout
        final: SipResponse | None = None
        next_send = 0.0
        while final is None:
            now = time.monotonic()
            assert now < deadline, f"no final response to {method} {call_id} in {self.timeout}s"
            if now >= next_send:
                self.sock.sendto(message, ("127.0.0.1", self.port))
                next_send = now + 0.5
            self.sock.settimeout(max(0.01, min(next_send, deadline) - now))
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            code = status(data) if data.startswith(b"SIP/2.0 ") else 0
            if code >= 200 and f"branch={branch}".encode() in data:
                final = SipResponse(code, data.decode(errors="replace"))
        if method == "INVITE" and final.status >= 300 and ack:
            # RFC 3261 17.1.1.3: the ACK's To is the response's (with the tag the adapter added).
            acknowledgement = same_transaction(message, "ACK", to=final.header("To"))
            self.sock.sendto(acknowledgement, ("127.0.0.1", self.port))
        return final
