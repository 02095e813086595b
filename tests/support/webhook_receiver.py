"""A real HTTP receiver for webhook tests: an aiohttp server on 127.0.0.1 (port chosen by the OS) that records every
request (time, headers, body) and answers from a script of responses the test sets."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import web


@dataclass(frozen=True)
class Received:
    at: float  # time.monotonic() when the request arrived
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    # "host:port" of the client's end of the connection (one per connection: tests see connection reuse)
    peer: str = ""

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay_s: float = 0.0  # answer after this long (a slow receiver)


@dataclass
class WebhookReceiver:
    """Answers `replies` in order, one per request (the last one repeated), or `respond(request)` if set."""

    url: str
    received: list[Received] = field(default_factory=list)
    replies: list[Reply] = field(default_factory=lambda: [Reply()])
    respond: Callable[[Received], Reply] | None = None
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    def script(self, replies: Sequence[Reply]) -> None:
        self.replies = list(replies)

    async def wait_for(self, count: int, timeout_s: float = 10.0) -> list[Received]:
        """Waits until at least `count` requests have arrived; fails the test after `timeout_s`."""
        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: len(self.received) >= count), timeout_s)
        return list(self.received)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        peername = request.transport.get_extra_info("peername") if request.transport is not None else None
        got = Received(
            time.monotonic(),
            request.path,
            {k.lower(): v for k, v in request.headers.items()},
            await request.read(),
            f"{peername[0]}:{peername[1]}" if peername else "",
        )
        if self.respond is not None:
            reply = self.respond(got)
        else:
            index = sum(1 for r in self.received if r.path == got.path)
            reply = self.replies[min(index, len(self.replies) - 1)]
        async with self._arrived:
            self.received.append(got)
            self._arrived.notify_all()
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        return web.Response(status=reply.status, headers=reply.headers, body=reply.body)


@asynccontextmanager
async def webhook_receiver(
    path: str = "/hook", *, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[WebhookReceiver]:
    """A receiver at http://127.0.0.1:<port><path> (any path is answered and recorded); with `ssl_context` (its
    certificate and key loaded), at https://127.0.0.1:<port><path>."""
    receiver = WebhookReceiver(url="")
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", receiver._handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    sockets = site._server.sockets if site._server is not None else []  # type: ignore[attr-defined]
    port = sockets[0].getsockname()[1]
    receiver.url = f"{'https' if ssl_context is not None else 'http'}://127.0.0.1:{port}{path}"
    try:
        yield receiver
    finally:
        await runner.cleanup()
