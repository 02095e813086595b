"""The chaos tests' profiles (short for `make test`, long for `make chaos`), the load's start and steady state, and
the report of each fault's figures (docs/reliability.md, "Faults")."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from support.chaos_load import LoadDriver, Recorder
from support.chaos_stack import ChaosStack
from support.chaos_verify import Figures, failures, figures, verify

# The RPCs of the mixed load that must succeed again once a fault is over.
LOAD_RPCS = ("CreateBinding", "UpdateBinding", "DeleteBinding", "Translate", "TranslateStream", "IngestCdrs")


@dataclass(frozen=True)
class Profile:
    name: str
    warmup: float  # load before the fault (s)
    outage: float  # how long the fault lasts (s)
    after: float  # load after the fault is healed (s)
    episodes: int  # repeats of a fault whose leaks are counted (slow Redis, latency)
    overload_calls: int
    filler_keys: int  # keys written besides the load before Redis is killed (a longer AOF load after the restart)


PROFILES = {
    "short": Profile("short", warmup=1.0, outage=1.0, after=1.0, episodes=2, overload_calls=5000, filler_keys=0),
    "long": Profile("long", warmup=10.0, outage=5.0, after=15.0, episodes=5, overload_calls=5000, filler_keys=200_000),
}


def report(row: Figures, text: str = "") -> None:
    """Prints the fault's figures; appends its table row to NUMPROTECT_CHAOS_REPORT when set."""
    print(row.text() + (f"\n{text}" if text else ""))
    target = os.environ.get("NUMPROTECT_CHAOS_REPORT")
    if target:
        with Path(target).open("a", encoding="utf-8") as out:
            out.write(row.row() + "\n")


@dataclass
class Running:
    stack: ChaosStack
    driver: LoadDriver


@asynccontextmanager
async def running(
    stack: ChaosStack, *, ready: tuple[str, ...] = LOAD_RPCS, **load: int | float
) -> AsyncIterator[Running]:
    """Starts a fresh load (its own ledger and recorder) on `stack` and waits for its steady state (each RPC of
    `ready` answered OK twice); closes it after."""
    driver = LoadDriver(stack, **load)  # type: ignore[arg-type]
    try:
        driver.start()
        if not await driver.wait_for_answers(ready, ok=2, within=60):
            raise AssertionError("no steady state before the fault:\n" + "\n".join(stack.unexpected_errors()[:5]))
        yield Running(stack, driver)
    finally:
        await driver.close()


async def recovered(run: Running, problems: list[str], after: str, within: float = 30.0) -> None:
    """Waits until every RPC of the load has answered OK again (twice); notes a problem if not within `within`."""
    if not await run.driver.wait_for_answers(LOAD_RPCS, ok=2, within=within):
        problems.append(f"the load did not succeed again within {within:g} s {after}")


def only(recorder: Recorder, start: float, end: float, allowed: set[str], during: str) -> list[str]:
    """A problem line when answers between `start` and `end` had codes other than `allowed`."""
    other = [a for a in recorder.between(start, end) if a.code not in allowed]
    if not other:
        return []
    codes = sorted({f"{a.rpc}:{a.code}" for a in other})
    return [f"{len(other)} answers {codes} {during} (only {sorted(allowed)} expected), e.g. {other[:2]}"]


async def conclude(run: Running, fault: str, text: str = "") -> tuple[Figures, list[str]]:
    """Stops the load, verifies every acknowledged write, prints the fault's figures; returns them and what
    failed."""
    await run.driver.stop()
    verdict = await verify(run.driver, run.stack)
    row = figures(fault, run.driver, verdict)
    report(row, text)
    return row, failures(row, verdict, run.stack)
