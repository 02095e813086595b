"""The one way code reads wall-clock time: a `Clock` passed to constructors.

Services take a Clock where they read the time of day in epoch milliseconds (ingest time, abuse windows,
create times); tests pass a `FixedClock` and move it. Deadlines and intervals measured within the process use
time.monotonic() and are not a Clock's business. Time inside Redis scripts comes from Redis (TIME), not from here.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int:
        """Epoch milliseconds (UTC)."""
        ...


class SystemClock:
    """The host's wall clock."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class FixedClock:
    """A clock that shows `ms` until moved (tests)."""

    def __init__(self, ms: int) -> None:
        self.ms = ms

    def now_ms(self) -> int:
        return self.ms

    def advance(self, ms: int) -> None:
        self.ms += ms
