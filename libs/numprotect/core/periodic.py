"""A background round on the service's event loop, repeated at an interval until shutdown (grpc.aio services)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

# A bounded wait for the task on shutdown: a cancellation swallowed inside a client (gh-86296) must not hold it up.
STOP_WAIT_SECONDS = 2.0


class Periodic:
    """Runs `work` now and then every `interval_seconds` after each round ends; a round that raises is logged (Redis
    down, say) and the next one tries again. `stop` cancels it and waits at most STOP_WAIT_SECONDS."""

    def __init__(self, name: str, work: Callable[[], Awaitable[object]], interval_seconds: float) -> None:
        self.name = name
        self.work = work
        self.interval = interval_seconds
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def _run(self) -> None:
        while True:
            try:
                await self.work()
            except Exception as exc:
                log.warning("%s round failed", self.name, extra={"error": repr(exc)})
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait({task}, timeout=STOP_WAIT_SECONDS)
