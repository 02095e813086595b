"""Each write of the binding service's own keys run twice with the same arguments, as a cluster client does when it
loses a reply and re-sends (docs/redis-schema.md, "Scripts run twice"): the second run leaves the state the first
left, and its answer is the one the table there promises."""

from __future__ import annotations

import functools
import time
from typing import Any

from binding.test_binding_scripts import redis

from numprotect.core.binding_records import order_key
from numprotect.services.binding.store import MutationLocks, OrderClaims, mutation_lock_key
from support.redis_state import run_twice as twice

__all__ = ["redis"]  # the fixture of the script tests, used here too

DAY = 86_400_000


def _now() -> int:
    return time.time_ns() // 1_000_000


async def test_order_claim_repeated_is_claimed_again(redis: Any, redis_sync: Any) -> None:
    """Without the check a repeat found its own claim 'busy' (the create waited on itself, then ABORTED), or past
    its deadline 'taken' (the create rolled itself back)."""
    orders = OrderClaims(redis)
    now = _now()
    for order, deadline in (("o1", now + 60_000), ("o2", now - 1)):
        claim = functools.partial(orders.claim, "t1", order, "b-one", "fp1", deadline, now + DAY)
        first, second = await twice(redis_sync, order_key("t1", order), claim)
        assert (first.outcome, first.binding_id) == (second.outcome, second.binding_id) == ("claimed", "b-one")
    # Another create of the same order is still told busy.
    busy = await orders.claim("t1", "o1", "b-two", "fp1", now + 60_000, now + DAY)
    assert (busy.outcome, busy.binding_id) == ("busy", "b-one")


async def test_order_claim_repeated_after_a_take_over(redis: Any, redis_sync: Any) -> None:
    """The first run took the order from a create past its deadline ('taken'); the repeat answers 'claimed'. The
    caller then does not roll the abandoned create back itself: the recovery does, from the pending-creates list
    (order_resolve.lua answers it 'gone')."""
    orders = OrderClaims(redis)
    now = _now()
    await orders.claim("t1", "o1", "b-old", "fp1", now - 1, now + DAY)
    first, second = await twice(
        redis_sync, order_key("t1", "o1"), lambda: orders.claim("t1", "o1", "b-new", "fp1", now + 60_000, now + DAY)
    )
    assert (first.outcome, first.binding_id) == ("taken", "b-old")
    assert (second.outcome, second.binding_id) == ("claimed", "b-new")
    assert await orders.resolve("t1", "o1", "b-old", own=False) == "gone"


async def test_order_commit_repeated_is_committed_again(redis: Any, redis_sync: Any) -> None:
    """Without the check the repeat answered 0 ('the claim is no longer yours') to a create that had committed."""
    orders = OrderClaims(redis)
    now = _now()
    await orders.claim("t1", "o1", "b-one", "fp1", now + 60_000, now + DAY)
    assert await twice(
        redis_sync, order_key("t1", "o1"), lambda: orders.commit("t1", "o1", "b-one", "fp1", now + 60_000, now + DAY)
    ) == (True, True)
    assert await orders.committed_binding("t1", "o1") == "b-one"
    # Another create's commit is still refused.
    assert not await orders.commit("t1", "o1", "b-two", "fp1", now + 60_000, now + DAY)


async def test_order_resolve_repeated_decides_the_same_way(redis: Any, redis_sync: Any) -> None:
    """'aborted' then 'gone': both roll the create back. 'done' then 'done'."""
    orders = OrderClaims(redis)
    now = _now()
    await orders.claim("t1", "o1", "b1", "fp", now + 60_000, now + DAY)
    assert await twice(redis_sync, order_key("t1", "o1"), lambda: orders.resolve("t1", "o1", "b1", own=True)) == (
        "aborted",
        "gone",
    )
    await orders.claim("t1", "o2", "b2", "fp", now + 60_000, now + DAY)
    await orders.commit("t1", "o2", "b2", "fp", now + 60_000, now + DAY)
    assert await twice(redis_sync, order_key("t1", "o2"), lambda: orders.resolve("t1", "o2", "b2", own=False)) == (
        "done",
        "done",
    )


async def test_lock_acquire_repeated_is_held_again(redis: Any, redis_sync: Any) -> None:
    """A lock's SET NX re-sent after its reply was lost found the key set (by itself) and the call answered ABORTED
    'being changed by another call'; SET NX GET tells the holder its own token. The release (compare_and_delete.lua)
    repeated answers 0, which the lock ignores: the key is gone either way."""
    locks = MutationLocks(redis, lease_ms=5000)
    key = mutation_lock_key("b1")
    assert await twice(redis_sync, key, lambda: locks.acquire(key, "token-1", 5000)) == (True, True)
    assert not await locks.acquire(key, "token-2", 5000)  # another call is still kept out
    assert await twice(redis_sync, key, lambda: locks._release(redis, [key], ["token-1"])) == (1, 0)
    assert redis_sync.exists(key) == 0
