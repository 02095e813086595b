"""SIPp against an adapter process told to stop (SIGTERM): the INVITE in flight still gets its 302, a new INVITE gets
503 + Retry-After at once (the carrier's switch tries another adapter), then the process exits cleanly."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request

from sip.conftest import A, B, SipStack, X

from support.processes import ServiceProcess
from support.sipp import Sipp


def _transactions(process: ServiceProcess) -> float:
    """The adapter process's numprotect_sip_transactions gauge, from its /metrics."""
    assert process.metrics_url is not None
    with urllib.request.urlopen(process.metrics_url, timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("numprotect_sip_transactions "):
                return float(line.split()[1])
    return 0.0


async def _holding_a_transaction(process: ServiceProcess, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while await asyncio.to_thread(_transactions, process) < 1:
        assert time.monotonic() < deadline, "the in-flight INVITE never reached the adapter"
        await asyncio.sleep(0.05)


async def test_sigterm_finishes_the_invite_in_flight_and_refuses_new_ones(sip_stack: SipStack) -> None:
    await sip_stack.bind_axb(A, B)
    process, port = await sip_stack.start_adapter_process({"NUMPROTECT_SIP_TRANSLATE_TIMEOUT": "4s"})
    sipp = Sipp(("127.0.0.1", port), sip_stack.tmp_path)
    sip_stack.translation_delay(1.0)  # the in-flight INVITE's answer comes ~2 s after it

    in_flight = asyncio.create_task(sipp.run("axb.xml", rows=[[A, X, B, X, sip_stack.egress]]))
    await _holding_a_transaction(process)
    process.signal(signal.SIGTERM)
    await asyncio.sleep(0.2)  # the signal handled: the adapter is draining
    refused = await sipp.run("unavailable.xml", rows=[[B, X]])
    answered = await in_flight

    answered.check(calls=1)
    refused.check(calls=1)
    [unavailable] = refused.received(503)
    assert unavailable.header("Retry-After") is not None
    exit_code = await asyncio.to_thread(process.process.wait, 15)
    assert exit_code == 0, "\n".join(process.lines[-20:])
