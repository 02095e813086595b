"""End to end through a carrier's proxy: SIPp as caller A -> Kamailio (deploy/sip/kamailio/kamailio.cfg) -> the
adapter -> 302 -> Kamailio follows it -> SIPp as party B. B sees only the 700 number; the call completes; the
carrier's CDR, written from Kamailio's log with the 302's call_ref, matches its binding in the real cdr service.

Kamailio runs for real (foreground, -E: its log on stderr into a file under tmp_path) on a port checked free
(Kamailio cannot bind port 0): a start that loses the port to another process is retried on another one. Every
wait is bounded and Kamailio is stopped (its process group) in a finally.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from sip.conftest import CARRIER, STRANGER, X2, A, B, SipStack, SipStackFactory, X

from numprotect.cdr.v1 import cdr_pb2, cdr_pb2_grpc
from numprotect.core.identity.principal import Role
from numprotect.services.cdr.app import build as build_cdr
from support.inprocess import running_service
from support.sipp import ROOT, SipMessage, Sipp, free_port, uri_user

CONFIG = ROOT / "deploy" / "sip" / "kamailio" / "kamailio.cfg"
KAMAILIO = shutil.which("kamailio") or "/usr/sbin/kamailio"  # Debian's kamailio (make system-deps)
START_SECONDS = 10.0
STOP_SECONDS = 5.0
START_ATTEMPTS = 3
CALL_SECONDS = 10.0
_CDR_LINE = re.compile(r"numprotect-cdr event=(\w+) (.*)$")


@dataclass
class Kamailio:
    """A running Kamailio: its SIP port (UDP and TCP on 127.0.0.1) and its log."""

    port: int
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def cdr_lines(self) -> list[dict[str, str]]:
        """The numprotect-cdr lines of the log, each as its key=value fields (plus "event")."""
        lines = []
        for line in self.log_text().splitlines():
            match = _CDR_LINE.search(line)
            if match:
                fields = dict(pair.split("=", 1) for pair in match.group(2).split())
                lines.append({"event": match.group(1), **fields})
        return lines

    async def wait_for_cdr(self, event: str, call_id: str) -> dict[str, str]:
        """The CDR line of `event` for `call_id` (Kamailio logs the release after B's 200 to the BYE reached A)."""
        deadline = time.monotonic() + CALL_SECONDS
        while time.monotonic() < deadline:
            for line in self.cdr_lines():
                if line["event"] == event and line.get("call_id") == call_id:
                    return line
            await asyncio.sleep(0.05)
        raise AssertionError(f"no numprotect-cdr event={event} for {call_id} in Kamailio's log:\n{self.log_text()}")


def _command(port: int, adapter_port: int, folder: Path) -> list[str]:
    return [
        KAMAILIO,
        "-f",
        str(CONFIG),
        "-DD",  # foreground: no daemon; the children are in the process group stopped below
        "-E",
        "-m",
        "32",
        "-M",
        "4",
        "-Y",
        str(folder),
        "-A",
        f"LISTEN_UDP=udp:127.0.0.1:{port}",
        "-A",
        f"LISTEN_TCP=tcp:127.0.0.1:{port}",
        "-A",
        f'NUMPROTECT_ADAPTER="sip:127.0.0.1:{adapter_port}"',
    ]


def _answers_options(port: int, process: asyncio.subprocess.Process, within: float) -> bool:
    """Whether Kamailio answers an OPTIONS to itself with 200 within `within` s (False as soon as it exits)."""
    deadline = time.monotonic() + within
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        probe.settimeout(0.1)
        own_port = probe.getsockname()[1]
        while time.monotonic() < deadline and process.returncode is None:
            branch = uuid.uuid4().hex
            request = (
                f"OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{own_port};branch=z9hG4bK{branch}\r\n"
                "Max-Forwards: 70\r\n"
                "From: <sip:probe@127.0.0.1>;tag=probe\r\n"
                f"To: <sip:127.0.0.1:{port}>\r\n"
                f"Call-ID: {branch}@127.0.0.1\r\n"
                "CSeq: 1 OPTIONS\r\n"
                "Content-Length: 0\r\n\r\n"
            )
            probe.sendto(request.encode(), ("127.0.0.1", port))
            with contextlib.suppress(TimeoutError):
                answer = probe.recv(65535).decode(errors="replace")
                if answer.startswith("SIP/2.0 200 ") and branch in answer:
                    return True
    return False


async def _stop(process: asyncio.subprocess.Process) -> None:
    """SIGTERM to Kamailio's process group (its own session), SIGKILL if it outlives the bound; every wait bounded."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process.returncode is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_SECONDS):
                await process.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # children left behind by a main process that ended first


@asynccontextmanager
async def running_kamailio(adapter_port: int, folder: Path) -> AsyncIterator[Kamailio]:
    """Kamailio with the shipped configuration in front of the adapter at 127.0.0.1:`adapter_port`."""
    for attempt in range(1, START_ATTEMPTS + 1):
        port = free_port()
        log = folder / f"kamailio-{attempt}.log"
        with log.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                *_command(port, adapter_port, folder),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        try:
            if await asyncio.to_thread(_answers_options, port, process, START_SECONDS):
                yield Kamailio(port, log)
                return
        finally:
            await _stop(process)
    raise AssertionError(f"Kamailio did not start in {START_ATTEMPTS} attempts:\n{log.read_text(errors='replace')}")


def test_the_shipped_configuration_passes_kamailios_check() -> None:
    checked = subprocess.run(
        [KAMAILIO, "-c", "-f", str(CONFIG)], capture_output=True, text=True, timeout=30, check=False
    )
    assert checked.returncode == 0, checked.stderr
    assert "config file ok" in checked.stderr


def _text(messages: list[SipMessage]) -> str:
    return "\n".join(message.text for message in messages)


@pytest.mark.parametrize("hangup", ["A", "B"])
async def test_a_call_through_kamailio_shows_b_only_the_700_number_and_its_cdr_matches_the_binding(
    sip_stack_factory: SipStackFactory, redis_env: dict[str, str], tmp_path: Path, hangup: str
) -> None:
    b_port = free_port()
    # The adapter's 302 sends the call to party B's SIPp (NUMPROTECT_SIP_EGRESS: the carrier's egress).
    async with sip_stack_factory(egress=f"127.0.0.1:{b_port}") as stack:
        binding = await stack.bind_axb(A, B)
        async with running_kamailio(stack.sip_port, tmp_path) as kamailio:
            sipp = Sipp(("127.0.0.1", kamailio.port), tmp_path)
            party_b = asyncio.create_task(
                sipp.run(
                    "kamailio_b.xml",
                    local_port=b_port,
                    variables={"virtual": X, "hangup": hangup},
                    time_limit=CALL_SECONDS,
                )
            )
            try:
                await asyncio.sleep(0.3)  # B's socket bound (were it not, Kamailio's retransmission would cover it)
                caller = await sipp.run(
                    "kamailio_a.xml",
                    service=X,
                    time_limit=CALL_SECONDS,
                    variables={"hangup": hangup},
                    # A's real number also in the Call-ID, as switches write it.
                    extra=["-key", "caller", A, "-cid_str", f"%u-{A}-%p@%s"],
                )
            except BaseException:
                party_b.cancel()  # the runner kills B's SIPp
                raise
            called = await party_b
            caller.check(calls=1)
            called.check(calls=1)

            [invite] = called.received_requests("INVITE")
            assert uri_user(invite.request_uri) == B
            assert uri_user(invite.header("From") or "") == X
            assert invite.header_values("P-Asserted-Identity") == [f"<sip:{X}@127.0.0.1:{b_port};user=phone>"]
            for absent in ("Remote-Party-ID", "P-Preferred-Identity", "Privacy", "User-Agent", "X-Original-Caller"):
                assert invite.header(absent) is None, absent
            # Who hung up: A's BYE reached B, or B's BYE reached A (with A's own number back in To).
            if hangup == "A":
                assert [m.method for m in called.received_requests()] == ["INVITE", "ACK", "BYE"]
            else:
                assert [m.method for m in called.received_requests()] == ["INVITE", "ACK"]
                [bye] = caller.received_requests("BYE")
                assert uri_user(bye.header("To") or "") == A
            # A's real number nowhere in what B received: headers, Call-ID, Contact, Via, SDP.
            assert A not in _text([m for m in called.messages if m.direction == "received"])
            # Nor B's in what A received (B's own Contact is masked on the way back).
            assert B not in _text([m for m in caller.messages if m.direction == "received"])
            [answer] = caller.received(200, "INVITE")[:1]
            assert uri_user(answer.header("From") or "") == A  # A's own From restored towards A

            call_id = caller.sent("INVITE")[0].call_id
            redirect = await kamailio.wait_for_cdr("redirect", call_id)
            answered = await kamailio.wait_for_cdr("answer", call_id)
            released = await kamailio.wait_for_cdr("release", call_id)

        assert (redirect["calling"], redirect["virtual"], redirect["target"]) == (A, X, B)
        assert answered["call_ref"] == released["call_ref"] == redirect["call_ref"]
        record = cdr_pb2.CallDetailRecord(
            call_id=call_id,
            call_ref=redirect["call_ref"],
            calling_number=redirect["calling"],
            called_number=redirect["virtual"],
            target_number=redirect["target"],
            call_type=cdr_pb2.CALL_TYPE_A_TO_PEER,
            release_direction=(cdr_pb2.RELEASE_DIRECTION_CALLER if hangup == "A" else cdr_pb2.RELEASE_DIRECTION_CALLEE),
            release_cause=16,
            unconnected_cause=cdr_pb2.UNCONNECTED_CAUSE_NONE,
            carrier_id=CARRIER,
        )
        record.call_time.FromMilliseconds(_ms(redirect["time"]))
        record.answer_time.FromMilliseconds(_ms(answered["time"]))
        record.release_time.FromMilliseconds(_ms(released["time"]))

        async with running_service("cdr", build_cdr, redis_env) as cdr:
            cdr.route(CARRIER, X)
            carrier = cdr_pb2_grpc.CdrServiceStub(cdr.channel_as(Role.CARRIER, CARRIER))
            reply = await carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=[record]), timeout=10)
            assert (reply.accepted, list(reply.rejected)) == (1, [])
            tenant = cdr_pb2_grpc.CdrServiceStub(cdr.channel_as(Role.TENANT, binding.route.tenant_id))
            listed = await tenant.ListCdrs(cdr_pb2.ListCdrsRequest(tenant_id=binding.route.tenant_id), timeout=10)

    [stored] = [r for r in listed.records if r.call_id == call_id]
    assert stored.binding_match == cdr_pb2.BINDING_MATCH_CALL_REF
    assert (stored.binding_id, stored.tenant_id, stored.out_order_id) == (
        binding.binding_id,
        binding.route.tenant_id,
        binding.record.out_order_id,
    )


def _ms(seconds: str) -> int:
    """Kamailio's $TV(Sn) ("seconds.microseconds") in milliseconds."""
    return round(float(seconds) * 1000)


async def test_the_adapters_refusals_reach_the_caller_through_kamailio_with_their_reason(
    sip_stack: SipStack, tmp_path: Path
) -> None:
    sip_stack.route_blocks(X, X2)
    async with running_kamailio(sip_stack.sip_port, tmp_path) as kamailio:
        sipp = Sipp(("127.0.0.1", kamailio.port), tmp_path)

        async def refused(caller: str, dialled: str) -> SipMessage:
            result = await sipp.run("kamailio_a_refused.xml", rows=[[caller, dialled]], time_limit=CALL_SECONDS)
            result.check(calls=1)
            [final] = [m for m in result.received() if (m.status or 0) >= 200]
            return final

        stranger = await refused(STRANGER, X)  # no binding on the carrier's number
        await sip_stack.bind_axb(A, B)
        await sip_stack.lock(X)
        locked = await refused(A, X)
        await sip_stack.bind_axe(A, B, "1234", number=X2)
        incomplete = await refused(A, X2)  # the extension is missing: the switch collects it
        sip_stack.translation_down()
        unavailable = await refused(A, X2)
        rejects = [line for line in kamailio.cdr_lines() if line["event"] == "reject"]

    finals = [stranger, locked, incomplete, unavailable]
    assert [(m.status, _cause(m)) for m in finals] == [(404, "1"), (480, "20"), (484, "28"), (500, "41")]
    for final in finals[:3]:
        assert final.header("Server") == "numprotect-sip"  # the adapter's own answer, relayed
    for final in finals:
        assert final.header("Contact") is None
    # The adapter's 503 reaches A as the proxy's 500 (RFC 3261 16.7: a 503 would say the proxy itself is down),
    # with the adapter's Reason and Retry-After.
    assert unavailable.header("Server") == "numprotect-carrier-proxy"
    assert (unavailable.header("Retry-After") or "").isdigit()
    assert [(line["code"], line["cause"], line["called"]) for line in rejects] == [
        ("404", "1", X),
        ("480", "20", X),
        ("484", "28", X2),
        ("503", "41", X2),
    ]


def _cause(message: SipMessage) -> str:
    """The Q.850 cause of a response's Reason header ("" without one)."""
    match = re.search(r"Q\.850;cause=(\d+)", message.header("Reason") or "")
    return match.group(1) if match else ""
