"""SIPp against the adapter: calls refused, each with its final response and Q.850 cause (docs/sip.md's table).
The scenarios fail a call whose response or Reason differs; the tests check what SIPp saw and that translation
decided each call (its own count)."""

from __future__ import annotations

from sip.conftest import STRANGER, A, B, SipStack, X

from support.sipp import SipMessage, SippResult


def _only_final(result: SippResult, status: int) -> SipMessage:
    """The one final response SIPp received, checked to be `status` and to send no one anywhere."""
    finals = [m for m in result.received() if (m.status or 0) >= 200]
    assert [m.status for m in finals] == [status], result.explain()
    final = finals[0]
    assert final.header("Contact") is None and final.header("P-Asserted-Identity") is None
    assert final.header("X-Numprotect-Call-Ref") is None
    return final


async def test_a_stranger_gets_404_with_q850_cause_1(sip_stack: SipStack) -> None:
    await sip_stack.bind_axb(A, B)
    before = sip_stack.translations()

    result = await sip_stack.sipp.run("stranger.xml", rows=[[STRANGER, X]])

    result.check(calls=1)
    final = _only_final(result, 404)
    assert (final.header("Reason") or "").startswith("Q.850;cause=1")
    assert sip_stack.translations() - before == 1


async def test_a_locked_number_gets_480_with_q850_cause_20(sip_stack: SipStack) -> None:
    await sip_stack.bind_axb(A, B)
    await sip_stack.lock(X)

    result = await sip_stack.sipp.run("locked.xml", rows=[[A, X]])

    result.check(calls=1)
    assert (_only_final(result, 480).header("Reason") or "").startswith("Q.850;cause=20")

    await sip_stack.unlock(X)  # the same call connects once the number is unlocked
    after = await sip_stack.sipp.run("axb.xml", rows=[[A, X, B, X, sip_stack.egress]])
    after.check(calls=1)


async def test_a_blocked_caller_gets_603_with_q850_cause_21(sip_stack: SipStack) -> None:
    await sip_stack.bind_axb(A, B)
    await sip_stack.block_caller(A)

    result = await sip_stack.sipp.run("blocked.xml", rows=[[A, X]])

    result.check(calls=1)
    assert (_only_final(result, 603).header("Reason") or "").startswith("Q.850;cause=21")
    # B, not blocked, still reaches A.
    other_way = await sip_stack.sipp.run("axb.xml", rows=[[B, X, A, X, sip_stack.egress]])
    other_way.check(calls=1)


async def test_the_adapter_refuses_bad_dialled_numbers_and_anonymous_callers_without_translating(
    sip_stack: SipStack,
) -> None:
    await sip_stack.bind_axb(A, B)
    before = sip_stack.translations()
    row = [A, "7001000", X + "12345", B, X]  # short; 15 + 5 digits; not a 700 number; X (anonymous, mailto:)

    result = await sip_stack.sipp.run("refusals.xml", rows=[row])

    result.check(calls=1)
    finals = [(m.status, m.header("CSeq")) for m in result.received() if (m.status or 0) >= 200]
    assert finals == [(484, "1 INVITE"), (404, "2 INVITE"), (404, "3 INVITE"), (433, "4 INVITE"), (416, "5 INVITE")]
    assert sip_stack.translations() == before
