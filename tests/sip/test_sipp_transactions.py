"""SIPp against the adapter: transaction handling. INVITE retransmissions cost one translation per call (counted by
translation itself), CANCEL before the final response gets 200 then 487 and the late answer is never sent, OPTIONS
gets 200, other methods 405."""

from __future__ import annotations

import itertools
from collections import defaultdict

from sip.conftest import A, B, SipStack, SipStackFactory, X

from support.sipp import SipMessage

CALLS = 5


def _by_call(messages: list[SipMessage]) -> dict[str, list[SipMessage]]:
    calls: dict[str, list[SipMessage]] = defaultdict(list)
    for message in messages:
        calls[message.call_id].append(message)
    return calls


async def test_invite_retransmissions_cause_one_translation_per_call_and_the_same_answer(
    sip_stack: SipStack,
) -> None:
    await sip_stack.bind_axb(A, B)
    # 0.2 s each way: the second INVITE surely reaches a transaction still waiting for its translation.
    sip_stack.translation_delay(0.2)
    before = sip_stack.translations()

    # -nr: SIPp's own UDP retransmission off, and with it its habit of resending its last request when an answer
    # equal to the previous one comes (the server's repeated 100 and 302 here): the scenario retransmits itself.
    result = await sip_stack.sipp.run("retransmit.xml", calls=CALLS, rows=[[A, X, B]], extra=["-nr"])

    result.check(calls=CALLS)
    invites = _by_call(result.sent("INVITE"))
    assert len(invites) == CALLS
    for call_id, sent in invites.items():
        assert len(sent) == 3
        assert len({m.header("Via") for m in sent}) == 1  # one branch: retransmissions, not new requests
        redirects = [m for m in result.of_call(call_id) if m.status == 302]
        assert len(redirects) == 2
        assert redirects[0].text == redirects[1].text  # the same final response, byte for byte
    # Translation's own count: one answer per call, whatever the adapter's caching claims.
    assert sip_stack.translations() - before == CALLS
    # The adapter's counts agree: 2 retransmissions per call absorbed, one request and one 302 per call.
    assert sip_stack.adapter_metric("numprotect_sip_retransmissions_total", {"method": "INVITE"}) == 2 * CALLS
    assert sip_stack.adapter_metric("numprotect_sip_requests_total", {"method": "INVITE", "transport": "udp"}) == CALLS
    assert sip_stack.adapter_metric("numprotect_sip_responses_total", {"method": "INVITE", "code": "302"}) == CALLS


async def test_invites_retransmitted_by_sipps_timer_cause_one_translation_per_call(sip_stack: SipStack) -> None:
    await sip_stack.bind_axb(A, B)
    # 0.4 s each way: SIPp (every 100 Trying lost) retransmits at 200 and 600 ms before the 302 can come.
    sip_stack.translation_delay(0.4)
    before = sip_stack.translations()

    result = await sip_stack.sipp.run("retransmit_timer.xml", calls=CALLS, rows=[[A, X, B]])

    result.check(calls=CALLS)
    invites = _by_call(result.sent("INVITE"))
    assert len(invites) == CALLS
    for sent in invites.values():
        assert len(sent) >= 3, [m.at for m in sent]  # the first and at least two retransmissions
        assert len({m.text for m in sent}) == 1  # the same bytes: a retransmission, one transaction
    assert sip_stack.translations() - before == CALLS


async def test_cancel_before_the_final_response_gets_200_then_487_and_the_late_answer_is_dropped(
    sip_stack_factory: SipStackFactory,
) -> None:
    # A generous deadline and a slow translation (0.5 s each way): the CANCEL surely arrives while translating.
    async with sip_stack_factory(adapter={"NUMPROTECT_SIP_TRANSLATE_TIMEOUT": "5s"}) as stack:
        await stack.bind_axb(A, B)
        stack.translation_delay(0.5)
        before = stack.translations()

        # 1.5 s of silence after the ACK: the translation's answer comes back meanwhile and must go nowhere.
        result = await stack.sipp.run("cancel.xml", rows=[[A, X, "1500"]], time_limit=15)

        result.check(calls=1)
        finals = [(m.status, m.method) for m in result.received() if (m.status or 0) >= 200]
        assert finals == [(200, "CANCEL"), (487, "INVITE")], result.explain()
        assert not result.received(302)
        # The translation did happen (it was under way): translation answered it once, the caller never saw it.
        assert stack.translations() - before == 1


async def test_a_cancel_after_the_final_response_changes_nothing_and_an_unknown_one_gets_481(
    sip_stack: SipStack,
) -> None:
    await sip_stack.bind_axb(A, B)

    result = await sip_stack.sipp.run("cancel_late.xml", rows=[[A, X]])

    result.check(calls=1)
    finals = [(m.status, m.header("CSeq")) for m in result.received() if (m.status or 0) >= 200]
    assert finals == [(302, "1 INVITE"), (200, "1 CANCEL"), (481, "2 CANCEL")], result.explain()


async def test_options_keepalive_gets_200(sip_stack: SipStack) -> None:
    result = await sip_stack.sipp.run("options.xml", calls=3)

    result.check(calls=3)
    for answer in result.received(200):
        allowed = {method.strip() for method in (answer.header("Allow") or "").split(",")}
        assert {"INVITE", "ACK", "CANCEL", "OPTIONS"} <= allowed
        assert answer.method == "OPTIONS"


async def test_other_methods_get_405_with_allow(sip_stack: SipStack) -> None:
    before = sip_stack.translations()

    result = await sip_stack.sipp.run("not_allowed.xml", rows=[[A, X]])

    result.check(calls=1)
    assert [(m.status, m.method) for m in result.received()] == [(405, "REGISTER"), (405, "MESSAGE")]
    assert sip_stack.translations() == before


async def test_the_final_response_is_retransmitted_over_udp_until_the_ack_and_not_after(sip_stack: SipStack) -> None:
    await sip_stack.bind_axb(A, B)

    result = await sip_stack.sipp.run("final_retransmitted.xml", rows=[[A, X, "2200", "1500"]])

    result.check(calls=1)
    [ack] = result.sent("ACK")
    redirects = [m.at for m in result.received(302)]
    before_ack = [at for at in redirects if at < ack.at]
    # Timer G: sent at 0, +0.5 s, +1.5 s (doubling; the next due at +3.5 s) within the 2.2 s without ACK.
    assert len(before_ack) == 3, redirects
    gaps = [round(later - earlier, 1) for earlier, later in itertools.pairwise(before_ack)]
    # Lower bounds only (not retransmitted early; doubling): a stalled SIPp or adapter may only delay them.
    assert gaps[0] >= 0.4 and gaps[1] >= 0.9 and gaps[1] > gaps[0], gaps
    assert [at for at in redirects if at > ack.at] == []  # the ACK stopped it (1.5 s more: one more was due)


async def test_the_final_response_is_not_retransmitted_over_tcp(sip_stack: SipStack) -> None:
    await sip_stack.bind_axb(A, B)

    result = await sip_stack.sipp.run("final_retransmitted.xml", rows=[[A, X, "1200", "100"]], transport="t1")

    result.check(calls=1)
    assert len(result.received(302)) == 1
