"""A background round on the service's event loop, repeated at an interval until shutdown (grpc.aio services)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

# A bounded wait for the task on shutdown: a cancellation swallowed inside a client (gh-86296) must not hold it up.
STOP_WAIT_SECONDS = 2.0
# How often a task that outlived its cancellation is cancelled again within that wait.
RECANCEL_SECONDS = 0.5


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
        await cancel_and_wait({task}, self.name)


async def cancel_and_wait(tasks: set[asyncio.Task[Any]], name: str, within: float = STOP_WAIT_SECONDS) -> None:
    """Cancels `tasks` and waits at most `within` for them to end, cancelling again every RECANCEL_SECONDS those still
    running: a cancellation swallowed inside a client (gh-86296, or a library turning it into an error that a round
    logs and goes on from) is followed by another, so the task ends now rather than run on after shutdown (and hang
    the event loop's own final cancellation). A task that needed a second cancellation is logged with where it was."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    pending = {task for task in tasks if not task.done()}
    cancels = 0
    while pending:
        if cancels == 1:
            for task in pending:
                log.warning("%s outlived its cancellation; cancelled again", name, extra={"task": _where(task)})
        for task in pending:
            task.cancel()
        cancels += 1
        left = deadline - loop.time()
        if left <= 0:
            log.warning("%s still running after %.1f s of cancellations", name, within, extra={"tasks": len(pending)})
            return
        _, pending = await asyncio.wait(pending, timeout=min(RECANCEL_SECONDS, left))


def _where(task: asyncio.Task[Any], depth: int = 3) -> str:
    """The task's name and the innermost coroutines it awaits in (file:line function, innermost first): where its
    cancellation went missing. (Task.get_stack shows the task's own coroutine only.)"""
    coro: Any = task.get_coro()
    frames = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        frames.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return " <- ".join([task.get_name(), *reversed(frames[-depth:])])
