"""SIPp against the adapter: calls that connect. AXB both directions over UDP and TCP, AXE (484, then the extension
-> 302). The scenarios (deploy/sip/sipp/) fail a call on any wrong header; the tests check again what SIPp saw."""

from __future__ import annotations

import pytest
from sip.conftest import A, B, SipStack, SipStackFactory, X

from numprotect.core.call_ref import CallRef
from support.sipp import Sipp, SippResult, uri_user


def _redirects(result: SippResult) -> dict[str, str]:
    """Calling number (PAI of the INVITE) -> Contact user of its 302."""
    callers = {m.call_id: uri_user(m.header("P-Asserted-Identity") or "") for m in result.sent("INVITE")}
    return {callers[m.call_id]: uri_user(m.header("Contact") or "") for m in result.received(302)}


@pytest.mark.parametrize("transport", ["u1", "t1"])
async def test_axb_redirects_each_party_to_the_other_showing_the_virtual_number(
    sip_stack: SipStack, transport: str
) -> None:
    binding = await sip_stack.bind_axb(A, B, recording=True)
    egress = sip_stack.egress
    rows = [[A, X, B, X, egress], [B, X, A, X, egress]]
    before = sip_stack.translations()

    result = await sip_stack.sipp.run("axb.xml", calls=2, rows=rows, transport=transport)

    result.check(calls=2)
    assert _redirects(result) == {A: B, B: A}
    for redirect in result.received(302):
        assert redirect.reason_phrase == "Moved Temporarily"
        assert redirect.header("Contact") in (f"<sip:{B}@{egress};user=phone>", f"<sip:{A}@{egress};user=phone>")
        assert redirect.header("P-Asserted-Identity") == f"<sip:{X}@{egress};user=phone>"
        assert redirect.header("X-Numprotect-Recording") == "on"
        ref = CallRef.decode(redirect.header("X-Numprotect-Call-Ref") or "")
        assert (ref.binding_id, ref.virtual_number) == (binding.binding_id, X)
        assert redirect.header("Server") == "numprotect-sip"
        assert redirect.transport == ("UDP" if transport == "u1" else "TCP")
    assert sip_stack.translations() - before == 2


async def test_carrier_forms_of_the_dialled_number_reach_the_same_binding(sip_stack: SipStack) -> None:
    await sip_stack.bind_axb(A, B)
    egress = sip_stack.egress
    rows = [[A, dialled, B, X, egress] for dialled in ("+86" + X, "86" + X, X)]

    result = await sip_stack.sipp.run("axb.xml", calls=len(rows), rows=rows)

    result.check(calls=len(rows))
    assert [uri_user(m.header("Contact") or "") for m in result.received(302)] == [B] * len(rows)


async def test_e164_number_format_puts_plus_86_numbers_in_contact_and_pai(sip_stack_factory: SipStackFactory) -> None:
    async with sip_stack_factory(adapter={"NUMPROTECT_SIP_NUMBER_FORMAT": "e164"}) as stack:
        await stack.bind_axb(A, B)

        result = await stack.sipp.run("axb.xml", rows=[[A, X, "+86" + B, "+86" + X, stack.egress]])

        result.check(calls=1)
        [redirect] = result.received(302)
        assert redirect.header("Contact") == f"<sip:+86{B}@{stack.egress};user=phone>"
        assert redirect.header("P-Asserted-Identity") == f"<sip:+86{X}@{stack.egress};user=phone>"


async def test_axe_asks_for_the_extension_then_redirects_with_it(sip_stack: SipStack) -> None:
    await sip_stack.bind_axe(A, B, "1234")
    before = sip_stack.translations()

    result = await sip_stack.sipp.run("axe.xml", rows=[[B, X, "1234", A, X, sip_stack.egress]])

    result.check(calls=1)
    [incomplete] = result.received(484)
    assert incomplete.header(
        "Reason",
    ) is not None and "cause=28" in (incomplete.header("Reason") or "")
    [redirect] = result.received(302)
    assert uri_user(redirect.header("Contact") or "") == A
    assert uri_user(redirect.header("P-Asserted-Identity") or "") == X
    second_invite = result.sent("INVITE")[-1]
    assert uri_user(second_invite.request_uri) == X + "1234"
    # 484 without asking translation? The contract decides by translation (COLLECT_EXTENSION): two answers.
    assert sip_stack.translations() - before == 2


async def test_the_adapter_process_redirects_over_udp_and_tcp(sip_stack: SipStack) -> None:
    """`python -m numprotect.services.sip` (the console script's module), its SIP port read from its ready line."""
    await sip_stack.bind_axb(A, B)
    process, port = await sip_stack.start_adapter_process()
    sipp = Sipp(("127.0.0.1", port), sip_stack.tmp_path)
    rows = [[A, X, B, X, sip_stack.egress], [B, X, A, X, sip_stack.egress]]

    for transport in ("u1", "t1"):
        result = await sipp.run("axb.xml", calls=2, rows=rows, transport=transport)
        result.check(calls=2)
        assert _redirects(result) == {A: B, B: A}
    assert process.process.poll() is None
