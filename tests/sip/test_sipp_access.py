"""SIPp against the adapter from a network it does not serve: requests are dropped silently (no answer helps a
scanner), counted by the adapter; translation is never asked."""

from __future__ import annotations

from sip.conftest import A, B, SipStackFactory, X


async def test_requests_from_outside_the_allowed_networks_get_no_answer(sip_stack_factory: SipStackFactory) -> None:
    async with sip_stack_factory(adapter={"NUMPROTECT_SIP_ALLOWED_NETWORKS": "10.0.0.0/8"}) as stack:
        await stack.bind_axb(A, B)
        before = stack.translations()

        # SIPp's -recv_timeout: a call waits 1 s for an answer, then fails (it would retransmit meanwhile).
        for scenario, transport in (("axb.xml", "u1"), ("options.xml", "u1"), ("axb.xml", "t1")):
            result = await stack.sipp.run(
                scenario, rows=[[A, X, B, X, stack.egress]], transport=transport, extra=["-recv_timeout", "1000"]
            )
            assert result.returncode != 0 and result.successful_calls == 0, result.explain()
            assert result.received() == [], result.explain()

        assert stack.adapter_metric("numprotect_sip_dropped_total", {"reason": "not_allowed"}) >= 2
        assert stack.translations() == before
