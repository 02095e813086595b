"""Each write of the binding service's own keys run twice with the same arguments, as a cluster client does when it
loses a reply and re-sends (docs/redis-schema.md, "Scripts run twice"): the second run leaves the state the first
left, and its answer is the one the table there promises."""

from __future__ import annotations

import functools
import time
from typing import Any

from binding.test_binding_scripts import redis
from core.test_binding_records import _record

from numprotect.core.binding_records import binding_key, order_key
from numprotect.core.routes import caller_key
from numprotect.core.settings import Env
from numprotect.services.binding.settings import BindingSettings
from numprotect.services.binding.store import (
    BindingStore,
    MutationLocks,
    OrderClaims,
    mutation_lock_key,
    new_binding_id,
)
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


async def test_lock_and_read_repeated_is_locked_again(redis: Any, redis_sync: Any) -> None:
    """The repeat finds the lock holding the call's own token: "locked" with the record again, where taking it with
    a plain SET NX would answer "busy" (the update ABORTED by itself)."""
    redis_sync.hset(binding_key("b1"), mapping={"t": "t1", "cms": "1", "st": "a"})
    locks = MutationLocks(redis, lease_ms=5000)
    keys = [binding_key("b1"), mutation_lock_key("b1")]
    first, second = await twice(redis_sync, "np:b:{b1}*", lambda: locks._take(redis, keys, ["t1", "token-1", 5000]))
    assert first == second and first[0] == b"locked"
    assert (await locks._take(redis, keys, ["t1", "token-2", 5000]))[0] == b"busy"  # another call is kept out


async def test_each_step_of_a_create_repeated_leaves_what_one_run_leaves(redis: Any, redis_sync: Any) -> None:
    """The steps whose commands go together (claim with the pending-creates entry; record, tenant index, routes
    with the number's history; routes with the record's commit mark), and the commit, each sent twice as a cluster
    client re-sends what it got no reply for: the second leaves every key as the first left it, and answers alike."""
    store = BindingStore.over(redis, BindingSettings.from_env(Env({})))
    now = _now()
    binding_id, deadline, expire = new_binding_id(now), now + 60_000, now + 3_600_000
    record = _record(binding_id, create_ms=now, out_order_id="o1", expire_ms=expire)
    claim = functools.partial(store.orders.claim, "t1", "o1", binding_id, "fp", deadline, expire + DAY, listed=True)
    first, second = await twice(redis_sync, "np:*", claim)
    assert (first.outcome, second.outcome) == ("claimed", "claimed")
    write = functools.partial(
        store.write_pending,
        record,
        reservation_id="r1",
        city_fallback=False,
        keep_until_ms=deadline + DAY,
        request="1|a|b",
        routes_until_ms=deadline,
    )
    assert await twice(redis_sync, "np:*", write) == (True, True)
    commit = functools.partial(store.orders.commit, "t1", "o1", binding_id, "fp", deadline, expire + DAY)
    assert await twice(redis_sync, "np:*", commit) == (True, True)
    assert await twice(redis_sync, "np:*", functools.partial(store.complete, record)) == (None, None)
    stored = await store.get(binding_id)
    assert stored is not None and not stored.pending
    assert redis_sync.pexpiretime(caller_key(record.virtual_number, record.party_a)) == expire
