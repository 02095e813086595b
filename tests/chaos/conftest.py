"""Fault injection: the four services as processes under a steady mixed load while one fault is injected.

Each test runs in two profiles (support/chaos_run.py): `short`, which `make test` runs (a few seconds of load per
fault), and `long`, marked `chaos` (`make chaos`: longer load and outages, repeated episodes). Each test prints its
row of docs/reliability.md's "Faults" table; NUMPROTECT_CHAOS_REPORT=<file> also appends the rows there.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from support.chaos_run import PROFILES, Profile
from support.chaos_stack import ChaosStack

# Redis' folder: a tmpfs this big, which the disk-full tests fill (the AOF of a long run, with its filler keys and a
# rewrite, stays far below it; tmpfs takes memory only for what is written).
DISK_BYTES = 512 * 1024 * 1024


@pytest.fixture(
    scope="session",
    params=[PROFILES["short"], pytest.param(PROFILES["long"], marks=pytest.mark.chaos)],
    ids=lambda profile: str(profile.name),
)
def profile(request: pytest.FixtureRequest) -> Profile:
    """Each fault runs short (in make test) and long (marked chaos: make chaos)."""
    chosen: Profile = request.param
    return chosen


@pytest.fixture(scope="session")
def stack() -> Iterator[ChaosStack]:
    """One stack for the faults that do not need proxies (each test runs its own load and checks its own writes;
    every fault heals what it broke, so the next test starts from a serving stack)."""
    started = ChaosStack(disk_bytes=DISK_BYTES)
    try:
        yield started
    finally:
        started.stop()
        for service, process in started.processes.items():
            # Shown by pytest when a test fails.
            print(f"--- {service} log (last 20 lines) ---", *process.lines[-20:], sep="\n")


@pytest.fixture(autouse=True)
def _stack_healthy_before_each_test(request: pytest.FixtureRequest) -> None:
    """A test that failed half-way may leave the shared stack broken; the next one starts from a healthy one."""
    if "stack" in request.fixturenames:
        request.getfixturevalue("stack").heal()
