"""The SIP listeners on real loopback sockets (UDP and TCP on one port), with the real handler, transaction table
and sweeper; a stand-in answers for the translation client (the SIPp tests run the real one)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvloop

from numprotect.core.metrics import Metrics
from numprotect.core.settings import SettingsError
from numprotect.services.sip import transport as sip_transport
from numprotect.services.sip.app import SipAdapter
from numprotect.services.sip.handler import SipHandler, SipMetrics
from numprotect.services.sip.settings import SipSettings
from numprotect.services.sip.transactions import T1, TransactionTable
from numprotect.services.sip.transport import SipServer
from numprotect.translation.v1 import translation_pb2
from support.sip_requests import header, request, same_transaction, status

WAIT = 5.0
QUIET = 0.3  # how long "no answer" is waited for
CONNECT = translation_pb2.TranslateResponse(
    decision=translation_pb2.DECISION_CONNECT, target_number="13900000002", display_number="700100000000001"
)


@asynccontextmanager
async def adapter(translator: Any, **environ: str) -> AsyncIterator[tuple[SipAdapter, Metrics]]:
    settings = SipSettings.from_env(
        {"NUMPROTECT_SIP_EGRESS": "198.51.100.7:5070", "NUMPROTECT_SIP_PORT": "0", **environ}
    )
    metrics = Metrics("sip")
    sip_metrics = SipMetrics(metrics)
    handler = SipHandler(settings, translator, lambda *f: f, sip_metrics, TransactionTable(settings.max_transactions))
    running = SipAdapter(settings, handler, SipServer(settings, handler, sip_metrics), translator)
    await running.start()
    try:
        yield running, metrics
    finally:
        await running.close()


class UdpClient(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.put_nowait(data)

    async def next(self) -> bytes:
        return await asyncio.wait_for(self.received.get(), WAIT)

    async def nothing(self) -> bool:
        try:
            await asyncio.wait_for(self.received.get(), QUIET)
        except TimeoutError:
            return True
        return False


@asynccontextmanager
async def udp_client(port: int) -> AsyncIterator[tuple[asyncio.DatagramTransport, UdpClient]]:
    transport, client = await asyncio.get_running_loop().create_datagram_endpoint(
        UdpClient, remote_addr=("127.0.0.1", port)
    )
    try:
        yield transport, client
    finally:
        transport.close()


async def read_response(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    return head


async def test_udp_invite_gets_100_and_302_retransmission_the_same_bytes_and_options_200(fake_translator: Any) -> None:
    translator = fake_translator(CONNECT)
    async with adapter(translator) as (running, _), udp_client(running.port) as (transport, client):
        invite = request()
        transport.sendto(invite)
        assert status(await client.next()) == 100
        final = await client.next()
        assert status(final) == 302
        assert header(final, "Contact") == "<sip:13900000002@198.51.100.7:5070;user=phone>"
        transport.sendto(invite)
        assert await client.next() == final
        transport.sendto(same_transaction(invite, "ACK"))
        transport.sendto(request("OPTIONS"))
        assert status(await client.next()) == 200
        assert len(translator.calls) == 1


async def test_udp_final_is_retransmitted_by_timer_g_until_the_ack(fake_translator: Any) -> None:
    translator = fake_translator(translation_pb2.TranslateResponse(decision=translation_pb2.DECISION_REJECT))
    async with adapter(translator) as (running, _), udp_client(running.port) as (transport, client):
        invite = request()
        transport.sendto(invite)
        assert status(await client.next()) == 100
        final = await client.next()
        assert status(final) == 403
        assert await asyncio.wait_for(client.received.get(), T1 * 3) == final  # Timer G
        transport.sendto(same_transaction(invite, "ACK"))
        await asyncio.sleep(0.05)
        while not client.received.empty():
            client.received.get_nowait()
        assert await asyncio.wait_for(client.nothing(), WAIT)
        await asyncio.sleep(T1 * 2)
        assert client.received.empty()


async def test_tcp_keepalive_invite_and_a_message_without_content_length_closes(fake_translator: Any) -> None:
    async with adapter(fake_translator(CONNECT)) as (running, metrics):
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        writer.write(b"\r\n\r\n")
        assert await asyncio.wait_for(reader.readexactly(2), WAIT) == b"\r\n"
        writer.write(request(transport="TCP"))
        assert status(await read_response(reader)) == 100
        assert status(await read_response(reader)) == 302
        assert metrics.registry.get_sample_value("numprotect_sip_tcp_connections", {}) == 1
        writer.write(request("OPTIONS", transport="TCP", omit=("Content-Length",)))
        answer = await read_response(reader)
        assert answer.startswith(b"SIP/2.0 400 Missing Content-Length\r\n")
        assert await asyncio.wait_for(reader.read(), WAIT) == b""  # closed
        writer.close()


async def test_too_large_udp_is_dropped_and_tcp_gets_513_then_close(fake_translator: Any) -> None:
    async with adapter(fake_translator(CONNECT), NUMPROTECT_SIP_MAX_MESSAGE_BYTES="1024") as (running, metrics):
        big = request("OPTIONS", body=b"x" * 2000)
        async with udp_client(running.port) as (transport, client):
            transport.sendto(big)
            assert await client.nothing()
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        writer.write(big)
        assert status(await read_response(reader)) == 513
        assert await asyncio.wait_for(reader.read(), WAIT) == b""
        writer.close()
        assert metrics.registry.get_sample_value("numprotect_sip_dropped_total", {"reason": "too_large"}) == 2


async def test_sources_outside_the_allowed_networks_get_nothing(fake_translator: Any) -> None:
    translator = fake_translator(CONNECT)
    async with adapter(translator, NUMPROTECT_SIP_ALLOWED_NETWORKS="10.0.0.0/8") as (running, metrics):
        async with udp_client(running.port) as (transport, client):
            transport.sendto(request("OPTIONS"))
            transport.sendto(request())
            assert await client.nothing()
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        writer.write(request("OPTIONS", transport="TCP"))
        assert await asyncio.wait_for(reader.read(), WAIT) == b""
        writer.close()
        assert metrics.registry.get_sample_value("numprotect_sip_dropped_total", {"reason": "not_allowed"}) == 3
        assert len(translator.calls) == 0


async def test_draining_answers_new_invites_503_with_retry_after(fake_translator: Any) -> None:
    async with adapter(fake_translator(CONNECT)) as (running, _), udp_client(running.port) as (transport, client):
        await running.handler.drain(1.0)
        transport.sendto(request())
        answer = await client.next()
        assert status(answer) == 503
        assert header(answer, "Retry-After") == "5"
        transport.sendto(request("OPTIONS"))
        assert status(await client.next()) == 503


async def test_tcp_connections_beyond_the_limit_and_idle_ones_are_closed(fake_translator: Any) -> None:
    environ = {"NUMPROTECT_SIP_MAX_CONNECTIONS": "1", "NUMPROTECT_SIP_TCP_IDLE_TIMEOUT": "1s"}
    async with adapter(fake_translator(CONNECT), **environ) as (running, metrics):
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        writer.write(b"\r\n\r\n")
        assert await asyncio.wait_for(reader.readexactly(2), WAIT) == b"\r\n"
        second_reader, second_writer = await asyncio.open_connection("127.0.0.1", running.port)
        assert await asyncio.wait_for(second_reader.read(), WAIT) == b""  # over the limit: closed at once
        second_writer.close()
        assert metrics.registry.get_sample_value("numprotect_sip_dropped_total", {"reason": "overload"}) == 1
        assert await asyncio.wait_for(reader.read(), WAIT) == b""  # idle past 1 s: closed by the sweeper
        writer.close()
        await asyncio.sleep(0.05)
        assert metrics.registry.get_sample_value("numprotect_sip_tcp_connections", {}) == 0


async def test_a_tcp_message_sent_one_byte_at_a_time_is_cut_off_at_its_deadline(
    monkeypatch: pytest.MonkeyPatch, fake_translator: Any
) -> None:
    """Slowloris: each byte restarts the idle clock (300 s here), but a begun message must be whole in
    MESSAGE_COMPLETE_SECONDS (1 s here instead of 10): the connection is closed and counted, whole messages are not."""
    monkeypatch.setattr(sip_transport, "MESSAGE_COMPLETE_SECONDS", 1.0)
    async with adapter(fake_translator(CONNECT)) as (running, metrics):
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        writer.write(request("OPTIONS", transport="TCP"))  # a whole message: answered, no deadline running
        assert status(await read_response(reader)) == 200
        started = asyncio.get_running_loop().time()
        closed = asyncio.ensure_future(reader.read())
        for byte in request("OPTIONS", transport="TCP"):
            if closed.done():
                break
            writer.write(bytes([byte]))
            await asyncio.sleep(0.1)
        try:  # closed before the message was whole: EOF, or a reset when a byte crossed the close
            rest = await asyncio.wait_for(closed, WAIT)
        except ConnectionResetError:
            rest = b""
        assert rest == b""
        assert asyncio.get_running_loop().time() - started >= 1.0  # not before its deadline
        writer.close()
        assert metrics.registry.get_sample_value("numprotect_sip_dropped_total", {"reason": "incomplete"}) == 1


async def test_a_top_via_with_a_received_ipv6_address_is_answered_with_one_received(fake_translator: Any) -> None:
    # RFC 3261 via-received is an unbracketed IPv6address (or IPv4); the response's top Via names the packet's
    # source once, replacing a received the request already carried.
    translator = fake_translator(CONNECT)
    async with adapter(translator) as (running, _), udp_client(running.port) as (transport, client):
        for via in (
            "SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bK-v6;received=2001:db8::9",
            "SIP/2.0/UDP 10.1.1.1:5060;branch=z9hG4bK-v4;received=192.0.2.1;rport",
        ):
            transport.sendto(request(via=via))
            trying = await client.next()
            assert status(trying) == 100
            assert (header(trying, "Via") or "").count("received=") == 1
            assert "received=127.0.0.1" in (header(trying, "Via") or "")
            assert status(await client.next()) == 302
        assert len(translator.calls) == 2


async def test_an_ims_caller_asserted_by_name_and_number_in_two_headers_is_the_number(fake_translator: Any) -> None:
    translator = fake_translator(CONNECT)
    async with adapter(translator) as (running, _), udp_client(running.port) as (transport, client):
        asserted = "P-Asserted-Identity: <sip:alice@ims.example>\r\nP-Asserted-Identity: <tel:+86-138-0000-0009>\r\n"
        transport.sendto(request(caller="anonymous", extra=asserted + "Privacy: id\r\n"))
        assert status(await client.next()) == 100
        assert status(await client.next()) == 302
        assert [call[0] for call in translator.calls] == ["13800000009"]  # the caller CallSetup carried


async def test_an_invite_inside_a_dialog_gets_481_without_a_translation(fake_translator: Any) -> None:
    translator = fake_translator(CONNECT)
    async with adapter(translator) as (running, _), udp_client(running.port) as (transport, client):
        uri = "sip:700100000000001@127.0.0.1"
        transport.sendto(request(uri=uri, extra=""))
        transport.sendto(request(uri=uri).replace(f"To: <{uri}>".encode(), f"To: <{uri}>;tag=b-1".encode()))
        answers = [status(await client.next()) for _ in range(3)]
        assert sorted(answers) == [100, 302, 481]
        assert len(translator.calls) == 1


async def test_a_translator_that_fails_to_start_leaves_the_sip_port_free(fake_translator: Any) -> None:
    settings = SipSettings.from_env({"NUMPROTECT_SIP_EGRESS": "198.51.100.7:5070", "NUMPROTECT_SIP_PORT": "0"})
    translator = fake_translator(CONNECT)

    async def failing_start() -> None:
        raise RuntimeError("no channel")

    translator.start = failing_start
    sip_metrics = SipMetrics(Metrics("sip"))
    handler = SipHandler(settings, translator, lambda *f: f, sip_metrics, TransactionTable(10))
    server = SipServer(settings, handler, sip_metrics)
    with pytest.raises(RuntimeError, match="no channel"):
        await SipAdapter(settings, handler, server, translator).start()
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):  # both listeners closed: the port binds again
        with socket.socket(socket.AF_INET, kind) as again:
            again.bind(("127.0.0.1", server.port))


def test_a_busy_port_is_one_settings_line_with_the_system_reason_under_uvloop(fake_translator: Any) -> None:
    # The process runs uvloop, whose UDP bind error carries the system's reason only as its cause.
    async def bind_twice() -> str:
        async with adapter(fake_translator(CONNECT), NUMPROTECT_SIP_TRANSPORTS="udp") as (running, _):
            try:
                async with adapter(fake_translator(CONNECT), NUMPROTECT_SIP_PORT=str(running.port)):
                    pass
            except SettingsError as error:
                return str(error)
        return ""

    message = uvloop.run(bind_twice())
    assert message.startswith("NUMPROTECT_SIP_PORT: cannot listen on 127.0.0.1:")
    assert message.endswith("(Address already in use)")
