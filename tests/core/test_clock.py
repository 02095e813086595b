"""The clock: the system clock reads the wall clock in epoch ms; a fixed clock shows what it is set to."""

from __future__ import annotations

import time

from numprotect.core.clock import Clock, FixedClock, SystemClock


def test_system_clock_reads_epoch_milliseconds() -> None:
    before = time.time_ns() // 1_000_000
    now = SystemClock().now_ms()
    after = time.time_ns() // 1_000_000
    assert before <= now <= after


def test_fixed_clock_stays_until_moved() -> None:
    clock: Clock = FixedClock(1_764_000_000_000)
    assert clock.now_ms() == clock.now_ms() == 1_764_000_000_000
    assert isinstance(clock, FixedClock)
    clock.advance(1500)
    assert clock.now_ms() == 1_764_000_001_500
