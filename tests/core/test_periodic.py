"""The background rounds' stop (numprotect.core.periodic): a round that swallows its cancellation is cancelled again
within the bounded wait, so no task runs on after shutdown (where the event loop's own final cancellation would
wait for it without end)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from numprotect.core.periodic import STOP_WAIT_SECONDS, Periodic, cancel_and_wait


class SwallowingWork:
    """A round whose client turns its first cancellation into an error (as gh-86296's wait_for, or a library mapping
    CancelledError to its own error, does): the round fails, Periodic logs it and goes on to its next round."""

    def __init__(self, swallow: int) -> None:
        self.swallow = swallow
        self.rounds = 0
        self.started = asyncio.Event()

    async def __call__(self) -> None:
        self.rounds += 1
        self.started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            if self.swallow > 0:
                self.swallow -= 1
                raise RuntimeError("the client's error for a cancelled call") from None
            raise


async def _running(name: str, work: SwallowingWork) -> Periodic:
    """`work` as a Periodic, started and inside its first round."""
    periodic = Periodic(name, work, interval_seconds=0.01)
    periodic.start()
    await work.started.wait()
    return periodic


async def test_a_round_that_swallows_its_cancellation_is_stopped_by_the_next(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="numprotect.core.periodic")
    work = SwallowingWork(swallow=1)
    periodic = await _running("swallowing round", work)
    task = periodic._task
    assert task is not None
    started = asyncio.get_running_loop().time()
    await periodic.stop()
    took = asyncio.get_running_loop().time() - started
    assert task.done() and task.cancelled()
    assert work.rounds == 2  # the swallowed cancellation let a second round start; the second cancellation ended it
    assert took < STOP_WAIT_SECONDS
    warnings = [r for r in caplog.records if "outlived its cancellation" in r.getMessage()]
    assert len(warnings) == 1 and "swallowing round" in warnings[0].getMessage()
    assert "test_periodic.py" in warnings[0].task  # type: ignore[attr-defined]


async def test_a_task_that_ends_on_its_first_cancellation_is_cancelled_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="numprotect.core.periodic")
    work = SwallowingWork(swallow=0)
    periodic = await _running("plain round", work)
    await periodic.stop()
    assert work.rounds == 1
    assert not caplog.records


async def test_a_task_that_never_ends_is_left_after_the_bounded_wait(caplog: pytest.LogCaptureFixture) -> None:
    """Shutdown is never held up beyond the wait, whatever the task does (it is told, and left)."""
    caplog.set_level(logging.WARNING, logger="numprotect.core.periodic")
    stop = asyncio.Event()

    async def stubborn() -> None:
        while not stop.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                continue

    task = asyncio.get_running_loop().create_task(stubborn())
    await asyncio.sleep(0)
    started = asyncio.get_running_loop().time()
    await cancel_and_wait({task}, "stubborn", within=0.3)
    took = asyncio.get_running_loop().time() - started
    assert 0.25 < took < 2.0 and not task.done()
    assert any("still running after" in r.getMessage() for r in caplog.records)
    stop.set()
    await task
