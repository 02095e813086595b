"""The HTTP side of webhook deliveries: one aiohttp session per process (docs/events.md, "Delivery").

Connections are kept and reused per receiver (aiohttp's pool is keyed by host, port and TLS; at most
`max_endpoint_concurrency` to one host, REQUESTS_IN_FLIGHT in all). A request is bounded by
NUMPROTECT_EVENTS_REQUEST_TIMEOUT (connect, send, the answer's headers and the part of its body read), follows no
redirect (a 3xx is a failed attempt), reads at most NUMPROTECT_EVENTS_MAX_RESPONSE_BYTES of the answer (a longer
one's connection is closed, not drained), keeps no cookies, and goes only to addresses the SSRF guard allows
(ssrf.py). An https receiver's certificate and host name are checked against the system's CAs and those of
NUMPROTECT_EVENTS_CA_FILE: an untrusted one is a failed attempt ("TLS certificate not trusted: ...").
"""

from __future__ import annotations

import email.utils
import ssl
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import hdrs

from numprotect.services.events.settings import EventsSettings
from numprotect.services.events.ssrf import (
    AddressPolicy,
    AddressRefused,
    GuardedResolver,
    UrlRefused,
    ip_literal,
    receiver_url,
)

# Requests in flight per process, over all endpoints (the dispatcher claims no more than this; the session's pool
# holds no more connections).
REQUESTS_IN_FLIGHT = 256
# How long a resolved (and checked) address is reused before the name is resolved again.
DNS_CACHE_SECONDS = 10
# A Retry-After further away than this is taken as this (a receiver cannot park an endpoint for longer).
MAX_RETRY_AFTER_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class SendResult:
    """What came of one request."""

    # The receiver's HTTP status; 0 when no answer came (refused address, connection failure, timeout).
    status: int
    # "" on a 2xx; else what went wrong, for ListDeliveries ("HTTP 500", "timeout after 10s", ...).
    error: str
    latency_s: float
    # The answer's Retry-After header as sent ("" when none).
    retry_after: str = ""
    # The answer's body, at most max_response_bytes of it.
    body: bytes = b""
    # No request was made: the URL or its address is not one deliveries may go to.
    refused: bool = False

    @property
    def succeeded(self) -> bool:
        return 200 <= self.status < 300


def retry_after_ms(header: str, now_ms: int) -> int | None:
    """A Retry-After value (delay seconds, or an HTTP date) as ms from `now_ms` (0 for a date already past), at most
    MAX_RETRY_AFTER_MS; None when absent or unreadable."""
    value = header.strip()
    if not value:
        return None
    if value.isdigit():
        return min(int(value) * 1000, MAX_RETRY_AFTER_MS)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT; parsedate leaves "-0000" naive
        return None
    return max(0, min(int(when.timestamp() * 1000) - now_ms, MAX_RETRY_AFTER_MS))


class WebhookSender:
    """Owns the process's aiohttp session (made on first use, on the running loop); `close` ends it."""

    def __init__(self, settings: EventsSettings) -> None:
        self.settings = settings
        self.policy = AddressPolicy(settings.allowed_networks)
        self._timeout = aiohttp.ClientTimeout(total=settings.request_timeout_s)
        # Made once (loading the system store costs milliseconds): every https receiver's certificate is checked.
        self._tls = settings.receiver_tls()
        self._session: aiohttp.ClientSession | None = None

    def _opened(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                resolver=GuardedResolver(self.policy),
                limit=REQUESTS_IN_FLIGHT,
                limit_per_host=self.settings.max_endpoint_concurrency,
                ttl_dns_cache=DNS_CACHE_SECONDS,
                ssl=self._tls,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                skip_auto_headers=(hdrs.ACCEPT_ENCODING,),
                trust_env=False,  # no proxy from the environment: the guard judges the receiver's own address
            )
        return self._session

    async def send(self, url: str, body: bytes, headers: dict[str, str]) -> SendResult:
        """POSTs `body` to `url`; never raises for what the receiver or the network does."""
        started = time.perf_counter()

        def failed(error: str, *, refused: bool = False) -> SendResult:
            return SendResult(0, error, time.perf_counter() - started, refused=refused)

        try:
            target = receiver_url(url, allow_http=self.settings.allow_http)
            if target.host is not None and ip_literal(target.host) is not None:
                self.policy.check(target.host)  # an IP literal never reaches the resolver
        except (UrlRefused, AddressRefused) as exc:
            return failed(str(exc), refused=True)
        try:
            async with self._opened().post(
                target, data=body, headers=headers, allow_redirects=False, timeout=self._timeout
            ) as response:
                answer = await _read_up_to(response.content, self.settings.max_response_bytes)
                status = response.status
                retry_after = response.headers.get(hdrs.RETRY_AFTER, "")
        except aiohttp.ClientConnectorDNSError as exc:
            if isinstance(exc.os_error, AddressRefused):
                return failed(str(exc.os_error), refused=True)
            return failed(f"name not resolved: {exc.host}")
        except aiohttp.InvalidUrlClientError as exc:
            # Not str(exc): it is the whole URL, whose path or query may carry the receiver's token (the error goes
            # to the attempt's record and the request's span).
            return failed(f"URL refused: {exc.description or 'not a URL aiohttp can request'}", refused=True)
        except aiohttp.ClientConnectorCertificateError as exc:
            return failed(f"TLS certificate not trusted: {_certificate_problem(exc.certificate_error)}")
        except aiohttp.ClientConnectorError as exc:
            return failed(f"connection failed: {exc.os_error.strerror or exc.os_error}")
        except TimeoutError:
            return failed(f"timeout after {self.settings.request_timeout_s:g}s")
        except aiohttp.ClientResponseError as exc:
            # An answer that is no valid HTTP. Not str(exc): it ends with the request's URL (path and query too).
            return failed(f"invalid HTTP answer: {exc.message}"[:300])
        except aiohttp.ClientError as exc:
            return failed(f"request failed: {type(exc).__name__}: {exc}"[:300])
        latency = time.perf_counter() - started
        if 200 <= status < 300:
            return SendResult(status, "", latency, retry_after, answer)
        error = f"HTTP {status}"
        if 300 <= status < 400:
            error += " (redirects are not followed)"
        return SendResult(status, error, latency, retry_after, answer)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def _certificate_problem(error: Exception) -> str:
    """Why a receiver's certificate was refused, in OpenSSL's words ("unable to get local issuer certificate")."""
    if isinstance(error, ssl.SSLCertVerificationError) and error.verify_message:
        return str(error.verify_message)
    return str(error)


async def _read_up_to(content: aiohttp.StreamReader, limit: int) -> bytes:
    """At most `limit` bytes of a body (the rest is never read: the connection is closed instead of reused)."""
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0:
        chunk = await content.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
