"""The token bucket behind binding's per-principal rate limits (numprotect.core.limits.RateLimit), on a fake clock."""

from __future__ import annotations

import pytest

from numprotect.core.errors import ResourceExhausted
from numprotect.core.limits import RateLimit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_the_rate_per_key() -> None:
    clock = Clock()
    limit = RateLimit(8, 3, name="NUMPROTECT_TEST_RATE", now=clock)
    for _ in range(3):
        limit.take("tenant:a")
    with pytest.raises(ResourceExhausted, match=r"NUMPROTECT_TEST_RATE exceeded: 8 calls/s .* retry in 0.125s") as e:
        limit.take("tenant:a")
    assert e.value.subject == "NUMPROTECT_TEST_RATE"
    limit.take("tenant:b")  # a bucket of its own
    clock.now += 0.125  # one token back (times exact in binary)
    limit.take("tenant:a")
    with pytest.raises(ResourceExhausted):
        limit.take("tenant:a")
    clock.now += 60  # refills to the burst, never beyond
    for _ in range(3):
        limit.take("tenant:a")
    with pytest.raises(ResourceExhausted):
        limit.take("tenant:a")


def test_memory_is_bounded_by_the_least_recently_used_buckets() -> None:
    clock = Clock()
    limit = RateLimit(1, 1, name="NUMPROTECT_TEST_RATE", max_keys=2, now=clock)
    limit.take("a")
    limit.take("b")
    with pytest.raises(ResourceExhausted):
        limit.take("a")  # a is now the most recently used
    limit.take("c")  # evicts b, the least recently used
    assert len(limit) == 2
    with pytest.raises(ResourceExhausted):
        limit.take("a")  # still remembered: still empty
    limit.take("b")  # forgotten: starts full again


def test_nonsense_limits_are_refused() -> None:
    for rate, burst in ((0, 1), (1, 0), (-1, 5)):
        with pytest.raises(ValueError):
            RateLimit(rate, burst, name="x")
