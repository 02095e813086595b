"""The SIP listeners: UDP (one datagram, one message) and TCP (messages framed by Content-Length, CRLF keep-alive),
on the same port, with the source-network allowlist and the size and connection limits."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
from typing import Any, cast

from numprotect.core.settings import SettingsError
from numprotect.services.sip.handler import SipHandler, SipMetrics
from numprotect.services.sip.message import Framed, Malformed, Request, StreamFramer, parse_request
from numprotect.services.sip.settings import IpNetwork, SipSettings
from numprotect.services.sip.transactions import Address

log = logging.getLogger(__name__)

# Receive buffer asked for the UDP socket: a burst of INVITEs waits in the kernel rather than being dropped.
UDP_RECEIVE_BUFFER_BYTES = 4 * 1024 * 1024
# A TCP peer that stops reading gets its connection closed past this much unsent data.
TCP_MAX_PENDING_WRITE_BYTES = 1024 * 1024
# How often idle TCP connections are looked for (seconds).
IDLE_CHECK_SECONDS = 1.0
# A message whose first bytes arrived must be whole within this (else the connection is closed, counted as
# dropped{reason="incomplete"}): the idle clock restarts on every byte, so without it a peer sending one byte at a
# time would hold a connection (of NUMPROTECT_SIP_MAX_CONNECTIONS) for ever. A switch writes a message at once.
MESSAGE_COMPLETE_SECONDS = 10.0
# How long close() waits for the TCP connections to finish flushing: bounded so a peer that never reads cannot hold
# shutdown; 2 s is ample for the last answers on a live link and well inside NUMPROTECT_GRACE_PERIOD.
CLOSE_WAIT_SECONDS = 2.0
_SOURCE_CACHE_SIZE = 4096
_CR_LF = (13, 10)
_BIND_ATTEMPTS = 8


class SourceFilter:
    """Whether a source address is inside the allowed networks (NUMPROTECT_SIP_ALLOWED_NETWORKS); answers are
    cached per address, the cache bounded."""

    __slots__ = ("_cache", "_networks")

    def __init__(self, networks: tuple[IpNetwork, ...]) -> None:
        self._networks = networks
        self._cache: dict[str, bool] = {}

    def __call__(self, host: str) -> bool:
        allowed = self._cache.get(host)
        if allowed is None:
            allowed = self._check(host)
            if len(self._cache) >= _SOURCE_CACHE_SIZE:
                self._cache.clear()
            self._cache[host] = allowed
        return allowed

    def _check(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack socket's IPv4 peer
        return any(address in network for network in self._networks)


class UdpListener(asyncio.DatagramProtocol):
    """Each datagram is one message; responses go back to the datagram's source (RFC 3581 style)."""

    reliable = False

    def __init__(self, handler: SipHandler, metrics: SipMetrics, allowed: SourceFilter, max_bytes: int) -> None:
        self._handler = handler
        self._metrics = metrics
        self._allowed = allowed
        self._max_bytes = max_bytes
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)  # (3.11's selector one is no subclass)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if not self._allowed(addr[0]):
            self._metrics.drop("not_allowed")  # silently: no help to scanners
            return
        if len(data) > self._max_bytes:
            self._metrics.drop("too_large")
            return
        if not data or (data[0] in _CR_LF and not data.strip(b"\r\n")):
            return  # a keep-alive (CRLF) datagram
        self._handler.handle(data, self, addr, "udp")

    def send(self, data: bytes, address: Address) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            try:
                transport.sendto(data, address)
            except OSError as exc:  # unreachable peer and the like: the switch retransmits
                log.debug("sip udp send failed", extra={"error": repr(exc)})

    def error_received(self, exc: Exception) -> None:
        log.debug("sip udp error", extra={"error": repr(exc)})

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class TcpConnection(asyncio.Protocol):
    """One TCP connection: framing, keep-alive pongs, and the idle clock."""

    reliable = True

    def __init__(self, server: SipServer) -> None:
        self._server = server
        self._framer = StreamFramer(server.settings.max_message_bytes)
        self._transport: asyncio.Transport | None = None
        self._peer: Address = ("", 0)
        self.last_active = 0.0
        self.message_started: float | None = None  # when the partial message buffered began to arrive

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        server = self._server
        peer = transport.get_extra_info("peername")
        if not isinstance(peer, tuple) or not server.allowed(peer[0]):
            server.metrics.drop("not_allowed")
            transport.abort()
            return
        if len(server.connections) >= server.settings.max_connections:
            server.metrics.drop("overload")
            transport.abort()
            return
        self._transport = transport
        self._peer = peer
        self.last_active = server.now()
        server.connections.add(self)
        server.metrics.tcp_connections.inc()

    def data_received(self, data: bytes) -> None:
        if self._transport is None:
            return
        server = self._server
        self.last_active = server.now()
        framed = self._framer.feed(data)
        if framed.pings:  # RFC 5626: each double-CRLF ping gets a single-CRLF pong
            self._transport.write(b"\r\n" * framed.pings)
        for message in framed.messages:
            if not server.handler.handle(message, self, self._peer, "tcp"):
                self.close()
                return
        if framed.error:
            server.refuse_framing(framed, self, self._peer)
            self.close()
            return
        if not self._framer.pending:
            self.message_started = None
        elif self.message_started is None:
            self.message_started = self.last_active

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._transport = None
            self._server.connections.discard(self)
            self._server.metrics.tcp_connections.dec()

    def send(self, data: bytes, address: Address) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size() > TCP_MAX_PENDING_WRITE_BYTES:
            transport.abort()  # the peer does not read its answers
            return
        transport.write(data)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class SipServer:
    """The UDP and TCP listeners on NUMPROTECT_SIP_HOST:NUMPROTECT_SIP_PORT (the same port number for both)."""

    def __init__(self, settings: SipSettings, handler: SipHandler, metrics: SipMetrics) -> None:
        self.settings = settings
        self.handler = handler
        self.metrics = metrics
        self.allowed = SourceFilter(settings.allowed_networks)
        self.connections: set[TcpConnection] = set()
        self.port = 0
        self._udp: UdpListener | None = None
        self._tcp: asyncio.AbstractServer | None = None
        self._next_idle_check = 0.0

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def start(self) -> int:
        """Binds the listeners; with port 0 the OS picks one UDP and TCP both get. Returns the port."""
        settings = self.settings
        for _ in range(_BIND_ATTEMPTS):
            try:
                await self._bind(settings.port)
                return self.port
            except OSError as exc:
                await self.close()
                cause = _os_error(exc)
                if settings.port != 0 or cause.errno != errno.EADDRINUSE:
                    raise SettingsError(
                        f"NUMPROTECT_SIP_PORT: cannot listen on {settings.host}:{settings.port} "
                        f"({cause.strerror or cause})"
                    ) from exc
        raise SettingsError(f"NUMPROTECT_SIP_PORT=0: no port free for both UDP and TCP on {settings.host}")

    async def _bind(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        settings = self.settings
        host = settings.host
        if "udp" in settings.transports:
            udp = UdpListener(self.handler, self.metrics, self.allowed, settings.max_message_bytes)
            transport, _ = await loop.create_datagram_endpoint(lambda: udp, local_addr=(host, port))
            self._udp = udp
            port = transport.get_extra_info("sockname")[1]
            _grow_receive_buffer(transport)
        if "tcp" in settings.transports:
            self._tcp = await loop.create_server(lambda: TcpConnection(self), host, port, reuse_address=True)
            port = self._tcp.sockets[0].getsockname()[1]
        self.port = port

    def refuse_framing(self, framed: Framed, connection: TcpConnection, peer: Address) -> None:
        """513 (too large) or 400 (no or bad Content-Length) to a TCP message that cannot be framed, when its
        head names where to answer."""
        self.metrics.drop("too_large" if framed.error_code == 513 else "malformed")
        head = framed.error_head
        if not head.endswith(b"\r\n\r\n"):
            head = head.rsplit(b"\r\n", 1)[0] + b"\r\n\r\n"  # a cut head: its whole lines
        request: Request | None
        try:
            request = parse_request(head)
        except Malformed as malformed:
            request = malformed.request
        except Exception:
            return
        if request is not None:
            self.handler.refuse_malformed(Malformed(framed.error, request, code=framed.error_code), connection, peer)

    def sweep(self, now: float) -> None:
        """Closes TCP connections idle past NUMPROTECT_SIP_TCP_IDLE_TIMEOUT, or with a message begun more than
        MESSAGE_COMPLETE_SECONDS ago and still not whole (checked once a second)."""
        if now < self._next_idle_check:
            return
        self._next_idle_check = now + IDLE_CHECK_SECONDS
        oldest = now - self.settings.tcp_idle_timeout
        started_before = now - MESSAGE_COMPLETE_SECONDS
        for connection in list(self.connections):
            started = connection.message_started
            if started is not None and started < started_before:
                self.metrics.drop("incomplete")
                connection.close()
            elif connection.last_active < oldest:
                connection.close()

    async def close(self) -> None:
        """Stops listening and closes every connection (their pending answers are flushed first)."""
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for connection in list(self.connections):
                connection.close()
            with contextlib.suppress(TimeoutError):  # bounded: a peer that never lets go does not hold shutdown
                await asyncio.wait_for(self._tcp.wait_closed(), timeout=CLOSE_WAIT_SECONDS)
            self._tcp = None


def _os_error(exc: OSError) -> OSError:
    """The OSError naming the system's reason: uvloop's UDP bind error has none of its own, only as its cause."""
    cause = exc.__cause__
    return cause if exc.errno is None and isinstance(cause, OSError) else exc


def _grow_receive_buffer(transport: Any) -> None:
    sock = transport.get_extra_info("socket")
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER_BYTES)
    except (OSError, AttributeError) as exc:  # capped by net.core.rmem_max; only costs drops under bursts
        log.debug("sip udp receive buffer not grown", extra={"error": repr(exc)})
