"""What a failed webhook request records as its error (ListDeliveries, the "webhook POST" span's status): never the
URL's path or query, which may carry a receiver's token (docs/events.md: spans never carry them)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from numprotect.core.settings import Env
from numprotect.services.events.sender import WebhookSender
from numprotect.services.events.settings import EventsSettings

HEADERS = {"content-type": "application/json"}
TOKEN = "tok3nInTheQuery"


@asynccontextmanager
async def answering(raw: bytes) -> AsyncIterator[int]:
    """A TCP server on loopback that answers every request with `raw` (no HTTP server would) and closes; its port."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(raw)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 5)


async def test_an_answer_that_is_not_http_is_recorded_without_the_url() -> None:
    sender = WebhookSender(
        EventsSettings.from_env(
            Env({"NUMPROTECT_EVENTS_ALLOW_HTTP": "1", "NUMPROTECT_EVENTS_ALLOWED_NETWORKS": "127.0.0.0/8"})
        )
    )
    try:
        async with answering(b"NOT-HTTP garbage\r\n\r\n") as port:
            result = await sender.send(f"http://127.0.0.1:{port}/hooks/secret-path?token={TOKEN}", b"{}", HEADERS)
    finally:
        await sender.close()
    assert (result.status, result.succeeded, result.refused) == (0, False, False)
    assert result.error.startswith("invalid HTTP answer"), result.error
    assert TOKEN not in result.error and "secret-path" not in result.error, result.error
