"""A TCP proxy on a loopback port that delays every chunk it forwards, for fault-injection tests.

It runs its own event loop in a thread, so a busy test loop does not add latency of its own. `delay` (seconds,
each direction) can change while connections are open; chunks keep their order. TLS passes through untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field

CHUNK_BYTES = 65536


@dataclass
class ProxyCounters:
    connections_opened: int = 0
    connections_closed: int = 0
    bytes_forwarded: int = 0
    open_connections: set[int] = field(default_factory=set)


class LatencyProxy:
    """Listens on 127.0.0.1:<port chosen by the OS> and forwards to `target_host:target_port`."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.delay = 0.0
        self.counters = ProxyCounters()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="latency-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")
        assert self._server is not None
        self.port: int = self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self._ready.set()
        self._loop.run_forever()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        ident = id(writer)
        self.counters.connections_opened += 1
        self.counters.open_connections.add(ident)
        pumps = [
            asyncio.ensure_future(self._pump(reader, upstream_writer)),
            asyncio.ensure_future(self._pump(upstream_reader, writer)),
        ]
        try:
            # Either side closing ends the pair: the other direction is closed too, as a real hop would.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            for side in (writer, upstream_writer):
                side.close()
            self.counters.open_connections.discard(ident)
            self.counters.connections_closed += 1

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Reads chunks, stamps them with their release time, writes them in order when due."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def release() -> None:
            while True:
                due, chunk = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not chunk:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(chunk)
                await writer.drain()
                self.counters.bytes_forwarded += len(chunk)

        releaser = asyncio.ensure_future(release())
        try:
            while True:
                chunk = await reader.read(CHUNK_BYTES)
                queue.put_nowait((time.monotonic() + self.delay, chunk))
                if not chunk:
                    break
            await releaser
        except (ConnectionError, OSError):
            pass
        finally:
            releaser.cancel()

    def close(self) -> None:
        """Stops listening and drops every open connection (bounded: the loop is stopped after 5 s at most)."""

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            current = asyncio.current_task()
            for task in asyncio.all_tasks():
                if task is not current:
                    task.cancel()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2)

        if self._loop.is_running():
            future = asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
            with contextlib.suppress(Exception):
                future.result(timeout=5)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
