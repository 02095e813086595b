"""The chaos verifier itself: losses and half-written state planted after a short load are each reported (so a
fault test that passes has really read everything back)."""

from __future__ import annotations

import time

from support.chaos_load import ExpectedBinding
from support.chaos_run import LOAD_RPCS, running
from support.chaos_stack import ChaosStack
from support.chaos_verify import verify


async def test_the_verifier_reports_each_planted_loss_and_half_written_route(stack: ChaosStack) -> None:
    async with running(stack) as run:
        assert await run.driver.wait_for_answers(LOAD_RPCS, ok=3, within=30)
        await run.driver.stop()
        ledger = run.driver.ledger
        live = [b for b in ledger.bindings.values() if not b.deleted and b.certain]
        assert len(live) >= 2 and ledger.cdrs
        vanished, changed = live[0], live[1]
        record_key = f"np:b:{{{vanished.binding_id}}}"
        client = stack.redis_client()
        try:
            # A binding record gone (its routes stay behind), and a route key of a binding that does not exist.
            # (The record is put back afterwards: the stack is shared with the other fault tests.)
            record, record_ttl_ms = client.dump(record_key), client.pttl(record_key)
            assert record is not None and client.delete(record_key) == 1
            stray = f"np:rt:{{{vanished.virtual_number}}}:c:13811112222"
            expire_ms = int(time.time() * 1000) + 600_000
            client.set(stray, f"b{'0' * 22}|r1|t-chaos|1|13811112222|13911112222|1|0|0|{expire_ms}", px=600_000)
        finally:
            client.close()
        # An update the service acknowledged but (as planted here) did not keep, and a CDR never stored.
        changed.party_b = "13900000000"
        ledger.cdrs["c-never-stored"] = changed.binding_id
        ledger.watched.add("c-never-stored")  # (as if watched: the verifier's wait for the watcher stays short)
        ledger.bindings["b-never-created"] = ExpectedBinding(
            "b" + "f" * 22, "o-never", "13800000001", "13900000001", vanished.virtual_number, 1, False, 0
        )

        verdict = await verify(run.driver, stack)

        client = stack.redis_client()
        try:
            client.delete(stray)
            client.restore(record_key, max(record_ttl_ms, 0), record)
        finally:
            client.close()
    assert vanished.binding_id in verdict.bindings_lost
    assert "b" + "f" * 22 in verdict.bindings_lost
    assert any(changed.binding_id in line and "party_b" in line for line in verdict.updates_lost)
    assert verdict.cdrs_lost == ["c-never-stored"]
    assert any(stray in line for line in verdict.half_written), verdict.half_written
    assert any(vanished.binding_id in line for line in verdict.half_written), verdict.half_written
    assert verdict.doctor, "the invariant checker found neither the stray route nor the orphaned routes"
    assert verdict.acknowledged_writes_lost == 4
