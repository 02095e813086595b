"""How long one call may work: the caller's deadline (`context.time_remaining()`) less the time to send the answer.

Every wait of a call (each Redis command waits up to NUMPROTECT_REDIS_TIMEOUT, each allocation call up to
NUMPROTECT_BINDING_ALLOCATION_TIMEOUT) runs inside its `CallBudget`, so several slow steps in a row end in an
UNAVAILABLE the caller receives before its deadline instead of a DEADLINE_EXCEEDED from its own library.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from numprotect.core.errors import Unavailable

# The answer must leave before the caller's deadline: 10 % of the time the call had, at least 50 ms (the loop's
# latency on a busy host), at most 250 ms.
ANSWER_MARGIN_SHARE = 0.1
ANSWER_MARGIN_MIN_SECONDS = 0.05
ANSWER_MARGIN_MAX_SECONDS = 0.25


@dataclass(frozen=True)
class CallBudget:
    """The moment (the event loop's clock, monotonic) by which a call answers."""

    answer_by: float

    @classmethod
    def within(cls, seconds: float) -> CallBudget:
        return cls(asyncio.get_running_loop().time() + max(seconds, 0.0))

    @classmethod
    def of_call(cls, context: Any, default_seconds: float) -> CallBudget:
        """The budget of a gRPC call: its deadline less the answer's margin; `default_seconds` without a deadline."""
        remaining = context.time_remaining() if context is not None else None
        if remaining is None:
            return cls.within(default_seconds)
        margin = min(ANSWER_MARGIN_MAX_SECONDS, max(ANSWER_MARGIN_MIN_SECONDS, remaining * ANSWER_MARGIN_SHARE))
        return cls.within(remaining - margin)

    def remaining(self) -> float:
        return max(self.answer_by - asyncio.get_running_loop().time(), 0.0)

    def remaining_ms(self) -> int:
        return int(self.remaining() * 1000)

    @asynccontextmanager
    async def bound(self, what: str, *, reserve: float = 0.0) -> AsyncIterator[None]:
        """Runs the block until `reserve` seconds before the answer is due (kept for what follows it, e.g. undoing
        a failed step); past that, the block is cancelled and UNAVAILABLE (retryable) raised."""
        timeout = asyncio.timeout_at(self.answer_by - reserve)
        try:
            async with timeout:
                yield
        except TimeoutError:
            if not timeout.expired():
                raise
            raise Unavailable(
                f"{what}: not finished within the call's deadline (storage or allocation slow); retry"
            ) from None
