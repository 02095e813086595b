"""number.locked / number.unlocked recorded by LockNumber / UnlockNumber (lock.lua, unlock.lua) in the outbox of the
number's sub-pool slot, in the script that changes the lock, with the slot's hint for the events service; a call
that changes nothing (locked already for that reason, unlocked already) records nothing."""

from __future__ import annotations

import time
from typing import Any

from allocation.test_allocation import BLOCK, import_block

from numprotect.allocation.v1 import allocation_pb2 as pb
from numprotect.core import pool_keys
from support.event_outbox import all_outbox_entries, hinted, outbox

SUBPOOLS = 4


async def test_lock_and_unlock_record_their_events_in_the_subpools_slot(
    allocation_service: Any, redis_sync: Any
) -> None:
    async with allocation_service(NUMPROTECT_ALLOCATION_SUBPOOLS=str(SUBPOOLS)) as stub:
        await import_block(stub)
        started = time.time() * 1000 - 1
        x = BLOCK + "0007"
        subpool = pool_keys.number_subpool_key("t1", "010", x, SUBPOOLS)
        lock = pb.LockNumberRequest(virtual_number=x, reason="abuse", actor="ops-1")
        await stub.LockNumber(lock)
        await stub.LockNumber(lock)  # locked already for this reason: no change, no event
        await stub.LockNumber(pb.LockNumberRequest(virtual_number=x, reason="fraud", actor="ops-2"))  # a new reason
        unlock = pb.UnlockNumberRequest(virtual_number=x, actor="ops-3")
        await stub.UnlockNumber(unlock)
        await stub.UnlockNumber(unlock)  # unlocked already
        entries = outbox(redis_sync, subpool)
        assert [{k: v for k, v in e.items() if k != "at"} for e in entries] == [
            {"ty": "number.locked", "tn": "t1", "src": x, "n": "", "d": "abuse|ops-1"},
            {"ty": "number.locked", "tn": "t1", "src": x, "n": "", "d": "fraud|ops-2"},
            {"ty": "number.unlocked", "tn": "t1", "src": x, "n": "", "d": "fraud|ops-3"},
        ]
        # `at`: Redis's clock (ms) when the script ran: in order, within the test.
        ats = [int(e["at"]) for e in entries]
        assert started <= ats[0] <= ats[1] <= ats[2] <= time.time() * 1000 + 1
        assert hinted(redis_sync, subpool)
        assert len(all_outbox_entries(redis_sync)) == 3  # none anywhere else
