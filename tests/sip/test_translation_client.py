"""The adapter's TranslationClient against the real translation service (in-process, or a real process for signals
and restarts) on real Redis: answers, batching seen at the server, deadlines, fail-fast, reconnects."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from sip.conftest import A as SIP_A
from sip.conftest import B as SIP_B
from sip.conftest import SipStack, SipStackFactory
from sip.conftest import X as SIP_X

from numprotect.core.identity.principal import Role
from numprotect.core.metrics import Metrics
from numprotect.core.redis_client import create_redis
from numprotect.core.routes import MODE_AXB, MODE_AXE, RESTRICTION_NONE, Route, RouteTable
from numprotect.core.settings import Env, RedisSettings
from numprotect.services.sip.settings import SipSettings
from numprotect.services.sip.translation_client import (
    CallSetup,
    TranslateFailure,
    TranslationClient,
    _answer,
    _Batch,
    failure_of,
)
from numprotect.services.translation.app import build_sync
from numprotect.translation.v1 import translation_pb2 as pb
from support.identity import mint_in, record_blocks
from support.inprocess import running_sync_service
from support.processes import ServiceProcess
from support.sip_requests import header, request, status
from support.tls import channel_for

X = "700100000000001"  # AXB: A <-> B
X_AXE = "700100000000002"  # AXE: extension 1234 -> A <-> B
OTHER_CARRIERS = "700200000000001"  # a block carrier "ct" routes
A = "13800000001"
B = "13900000002"
STRANGER = "13700000003"
CARRIER = "cm"
TRANSLATION_SETTINGS = {"NUMPROTECT_TRANSLATION_RATE_PER_CALLER": "0", "NUMPROTECT_TRANSLATION_RATE_PER_BINDING": "0"}
STREAM_METHOD = {
    "grpc_type": "bidi_stream",
    "grpc_service": "numprotect.translation.v1.TranslationService",
    "grpc_method": "TranslateStream",
}


def _route(binding_id: str, mode: int = MODE_AXB) -> Route:
    return Route(
        binding_id=binding_id,
        tenant_id="t1",
        mode=mode,
        party_a=A,
        party_b=B,
        call_restriction=RESTRICTION_NONE,
        recording_enabled=True,
        allow_any_caller=False,
        expire_ms=int(time.time() * 1000) + 600_000,
    )


async def _seed(redis_env: dict[str, str], sync_redis: Any) -> None:
    """X and X_AXE routed for carrier CARRIER; OTHER_CARRIERS's block is carrier "ct"'s."""
    redis = create_redis(RedisSettings.from_env(Env(redis_env)))
    table = RouteTable(redis)
    await table.put(X, _route("b1"))
    await table.put(X_AXE, _route("e1", MODE_AXE), "1234")
    await redis.aclose()
    record_blocks(sync_redis, CARRIER, X, X_AXE)
    record_blocks(sync_redis, "ct", OTHER_CARRIERS)


def _settings(**overrides: str) -> SipSettings:
    return SipSettings.from_env(
        Env(
            {
                "NUMPROTECT_SIP_EGRESS": "127.0.0.1:5070",
                "NUMPROTECT_SIP_TRANSLATE_TIMEOUT": "200ms",
                **{f"NUMPROTECT_SIP_{name.upper()}": value for name, value in overrides.items()},
            }
        )
    )


@asynccontextmanager
async def _client(
    channel_factory: Callable[[], grpc.aio.Channel],
    settings: SipSettings,
    *,
    wait_up: bool = True,
    up_within: float = 10.0,
) -> AsyncIterator[tuple[TranslationClient, Metrics]]:
    metrics = Metrics("sip")
    client = TranslationClient(channel_factory, settings, metrics)
    await client.start()
    try:
        if wait_up:
            await _until(lambda: client.up, up_within)
        yield client, metrics
    finally:
        started = time.monotonic()
        await client.close()
        assert time.monotonic() - started < 5.0  # bounded


async def _until(condition: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def _call(caller: str, called: str = X, extension: str = "", call_id: str = "c1") -> CallSetup:
    return CallSetup(calling_number=caller, called_number=called, extension=extension, call_id=call_id)


def _streams_gauge(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("numprotect_sip_translation_streams")


async def test_answers_connect_reject_collect_and_errors_while_the_stream_stays_up(
    redis_env: dict[str, str],
) -> None:
    async with running_sync_service("translation", build_sync, {**redis_env, **TRANSLATION_SETTINGS}) as service:
        await _seed(redis_env, service.redis)
        service.runtime.identity.directory.reload()  # type: ignore[union-attr]
        registry = service.runtime.metrics.registry
        # Up as soon as translation answers the probe (milliseconds), not after the stall limit (here 10 s).
        settings = _settings(streams="2", translate_timeout="2s")
        async with _client(lambda: service.channel_as(Role.CARRIER, CARRIER), settings, up_within=5.0) as (
            client,
            metrics,
        ):
            await _until(lambda: _streams_gauge(metrics) == 2.0, 5.0)  # the second one may come a moment later
            opened = registry.get_sample_value("grpc_server_started_total", STREAM_METHOD)
            connect = await client.translate(_call(A, call_id="call-a@10.0.0.1"))
            assert isinstance(connect, pb.TranslateResponse)
            assert (connect.decision, connect.target_number, connect.display_number) == (pb.DECISION_CONNECT, B, X)
            assert connect.call_id == "call-a@10.0.0.1" and connect.call_ref
            reject = await client.translate(_call(STRANGER))
            assert isinstance(reject, pb.TranslateResponse)
            assert (reject.decision, reject.reject_reason) == (pb.DECISION_REJECT, pb.REJECT_REASON_NO_BINDING)
            collect = await client.translate(_call(B, X_AXE))
            assert isinstance(collect, pb.TranslateResponse) and collect.decision == pb.DECISION_COLLECT_EXTENSION
            extension = await client.translate(_call(B, X_AXE, "1234"))
            assert isinstance(extension, pb.TranslateResponse)
            assert (extension.decision, extension.target_number) == (pb.DECISION_CONNECT, A)

            denied = await client.translate(_call(A, OTHER_CARRIERS))
            assert isinstance(denied, TranslateFailure) and denied.status == "PERMISSION_DENIED", denied
            invalid = await client.translate(_call(A, "700123"))
            assert isinstance(invalid, TranslateFailure) and invalid.status == "INVALID_ARGUMENT", invalid
            # Per-call errors: the streams stay open (no new stream at the server) and answer the next call.
            after = await client.translate(_call(B, call_id="after"))
            assert isinstance(after, pb.TranslateResponse) and after.target_number == A
            assert client.up and _streams_gauge(metrics) == 2.0
            assert registry.get_sample_value("grpc_server_started_total", STREAM_METHOD) == opened == 2.0


async def test_streams_ended_by_a_key_translation_refuses_are_counted_as_unauthenticated(
    redis_env: dict[str, str],
) -> None:
    """The calls then fail UNAVAILABLE (no stream up); the stream-end counter tells the operator why."""

    def ended(metrics: Metrics, status: str) -> float:
        value = metrics.registry.get_sample_value("numprotect_sip_translation_stream_ends_total", {"status": status})
        return value or 0.0

    environ = {**redis_env, **TRANSLATION_SETTINGS}
    settings = _settings(streams="2")
    async with (
        running_sync_service("translation", build_sync, environ) as service,
        _client(lambda: service.channel_with("np_not-a-key"), settings, wait_up=False) as (client, metrics),
    ):
        await _until(lambda: ended(metrics, "UNAUTHENTICATED") >= 2, 10.0)
        failed = await client.translate(_call(A))
        assert isinstance(failed, TranslateFailure) and failed.status == "UNAVAILABLE"
        assert not client.up and ended(metrics, "UNAVAILABLE") == 0


async def test_calls_of_one_loop_iteration_go_out_as_one_message(redis_env: dict[str, str]) -> None:
    async with running_sync_service("translation", build_sync, {**redis_env, **TRANSLATION_SETTINGS}) as service:
        await _seed(redis_env, service.redis)
        service.runtime.identity.directory.reload()  # type: ignore[union-attr]
        registry = service.runtime.metrics.registry
        # A 2 s deadline (not 200 ms): what counts here is the messages, not a loaded host's stalls.
        settings = _settings(streams="1", batch_max="8", translate_timeout="2s")
        async with _client(lambda: service.channel_as(Role.CARRIER, CARRIER), settings) as (client, _):

            def received() -> float:
                return registry.get_sample_value("grpc_server_msg_received_total", STREAM_METHOD) or 0.0

            before = received()  # the stream's probe
            calls = [_call(A if i % 2 else B, call_id=f"batched-{i}") for i in range(20)]
            answers = await asyncio.gather(*(client.translate(call) for call in calls))
            for call, answer in zip(calls, answers, strict=True):
                assert isinstance(answer, pb.TranslateResponse), answer
                assert answer.call_id == call.call_id
                assert answer.target_number == (B if call.calling_number == A else A)
            # 20 calls submitted together, at most 8 per message: 3 messages reached translation.
            assert received() - before == 3
            # One at a time (each awaited): a message each.
            for i in range(3):
                single = await client.translate(_call(A, call_id=f"single-{i}"))
                assert isinstance(single, pb.TranslateResponse) and single.call_id == f"single-{i}"
            assert received() - before == 6

            # Calls of successive loop iterations while the stream is busy (a message unanswered): they join the
            # open message instead of each making its own.
            busy_before = received()
            pending = []
            for i in range(12):
                pending.append(asyncio.ensure_future(client.translate(_call(A, call_id=f"busy-{i}"))))
                await asyncio.sleep(0)  # the next loop iteration
            for i, answer in enumerate(await asyncio.gather(*pending)):
                assert isinstance(answer, pb.TranslateResponse) and answer.call_id == f"busy-{i}", answer
            assert received() - busy_before < 12


async def test_no_stream_fails_at_once(redis_env: dict[str, str]) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"  # closed again: nothing listens there
    environ = {**redis_env, "NUMPROTECT_TLS": "off"}
    async with _client(lambda: channel_for(address, environ), _settings(streams="2"), wait_up=False) as (
        client,
        metrics,
    ):
        for _ in range(3):
            answer = await client.translate(_call(A))
            # UNAVAILABLE, not DEADLINE_EXCEEDED: refused without waiting for the deadline (no timed bound here).
            assert isinstance(answer, TranslateFailure) and answer.status == "UNAVAILABLE"
            assert not client.up and _streams_gauge(metrics) == 0.0
            await asyncio.sleep(0.2)  # reconnect attempts meanwhile fail too


async def test_deadline_late_answers_stall_and_restart_of_a_real_process(
    redis_env: dict[str, str], redis_sync: Any
) -> None:
    """SIGSTOP: calls fail at their deadline; a short stop (or a stall of the adapter's loop) leaves the stream up
    and its late answers are dropped; a long one ends the stream (calls then fail at once) until translation answers
    again; a restart is followed."""
    environ = {**redis_env, **TRANSLATION_SETTINGS}
    await _seed(redis_env, redis_sync)
    token = mint_in(redis_env, Role.CARRIER, CARRIER)  # before the process starts: it loads keys at start
    process = ServiceProcess("translation", environ)
    processes = [process]
    try:
        port = process.port
        async with _client(lambda: channel_for(process.address, process.env, token), _settings(streams="1")) as (
            client,
            metrics,
        ):
            first = await client.translate(_call(A, call_id="before-stop"))
            assert isinstance(first, pb.TranslateResponse) and first.target_number == B

            stream_call = client._streams[0].call  # the open TranslateStream: a reconnect replaces it

            # A host stall of translation's side (stopped 1.5 s, below the stall limit, 3 s) with a call outstanding:
            # the deadline, then the same stream goes on.
            process.signal(signal.SIGSTOP)
            started = time.monotonic()
            late = await client.translate(_call(A, call_id="late"))
            waited = time.monotonic() - started
            while time.monotonic() - started < 1.5:
                assert client.up
                await asyncio.sleep(0.05)
            process.signal(signal.SIGCONT)
            assert isinstance(late, TranslateFailure) and late.status == "DEADLINE_EXCEEDED", late
            # At its deadline (200 ms), well before SIGCONT (1.5 s): loose upper bound for a loaded host.
            assert 0.19 <= waited < 1.5, waited
            resumed = await client.translate(_call(B, call_id="after-late"))  # not "late"'s answer
            assert isinstance(resumed, pb.TranslateResponse), resumed
            assert (resumed.call_id, resumed.target_number) == ("after-late", A)

            # A stall of the adapter's own host (its loop not run for 1.5 s) with a call outstanding: its deadline
            # or its answer, never UNAVAILABLE, and the same stream goes on.
            process.signal(signal.SIGSTOP)  # so the call is still outstanding when the loop stops
            pending = asyncio.ensure_future(client.translate(_call(A, call_id="adapter-stall")))
            await asyncio.sleep(0.05)
            assert client._streams[0].inflight  # sent, unanswered
            time.sleep(1.5)  # noqa: ASYNC251  # the adapter's loop stalls, on purpose
            process.signal(signal.SIGCONT)
            stalled_call = await pending
            assert isinstance(stalled_call, TranslateFailure) and stalled_call.status == "DEADLINE_EXCEEDED"
            after_stall = await client.translate(_call(B, call_id="after-adapter-stall"))
            assert isinstance(after_stall, pb.TranslateResponse) and after_stall.call_id == "after-adapter-stall"
            assert client.up and client._streams[0].call is stream_call  # never reconnected

            # A long stop: the stalled stream ends; calls fail at once until translation answers again.
            process.signal(signal.SIGSTOP)
            try:
                stalled = await client.translate(_call(A, call_id="stalled"))
                assert isinstance(stalled, TranslateFailure) and stalled.status == "DEADLINE_EXCEEDED"
                await _until(lambda: not client.up, 8.0)  # the stall limit, 3 s, after the last answer
                assert _streams_gauge(metrics) == 0.0
                refused = await client.translate(_call(A, call_id="refused"))
                # UNAVAILABLE (no stream), not DEADLINE_EXCEEDED: refused at once, not after the deadline.
                assert isinstance(refused, TranslateFailure) and refused.status == "UNAVAILABLE"
            finally:
                process.signal(signal.SIGCONT)
            await _until(lambda: client.up, 10.0)
            back = await client.translate(_call(A, call_id="back"))
            assert isinstance(back, pb.TranslateResponse) and back.target_number == B

            # A restart on the same address: the stream ends, then comes back on the new process.
            process.stop()
            await _until(lambda: not client.up, 5.0)
            down = await client.translate(_call(A, call_id="down"))
            assert isinstance(down, TranslateFailure) and down.status == "UNAVAILABLE"
            process = ServiceProcess("translation", environ, port=port)
            processes.append(process)
            await _until(lambda: client.up, 15.0)
            restarted = await client.translate(_call(A, call_id="restarted"))
            assert isinstance(restarted, pb.TranslateResponse) and restarted.target_number == B
            assert _streams_gauge(metrics) == 1.0
    finally:
        for each in processes:
            if each.process.poll() is None:
                each.signal(signal.SIGCONT)
            each.stop()


async def test_answers_are_matched_by_order_and_call_id() -> None:
    """The matching rule on its own (translation never breaks the order, so no server can show the other side)."""
    loop = asyncio.get_running_loop()

    def batch(*call_ids: str) -> Any:
        made = _Batch(None, pb.TranslateStreamRequest())  # type: ignore[arg-type]  # no stream needed here
        for call_id in call_ids:
            made.call_ids.append(call_id)
            made.futures.append(loop.create_future())
        return made

    def answer(*items: tuple[str, str]) -> pb.TranslateStreamResponse:
        message = pb.TranslateStreamResponse()
        for call_id, error in items:
            response = message.responses.add(call_id=call_id, error=error)
            if not error:
                response.response.call_id = call_id
        return message

    ok = batch("a", "b")
    ok.futures[0].set_result(TranslateFailure("DEADLINE_EXCEEDED", "late"))  # its answer comes after the deadline
    assert _answer(ok, answer(("a", ""), ("b", "PERMISSION_DENIED: not this carrier's block")))
    assert ok.futures[0].result().status == "DEADLINE_EXCEEDED"  # the late answer is dropped
    assert ok.futures[1].result() == TranslateFailure("PERMISSION_DENIED", "not this carrier's block")

    swapped = batch("a", "b")
    assert not _answer(swapped, answer(("b", ""), ("a", "")))  # order lost: the stream is ended
    assert not _answer(batch("a"), answer(("a", ""), ("b", "")))

    whole = batch("a", "b")
    whole_error = pb.TranslateStreamResponse(error="INVALID_ARGUMENT: requests: at most 1 calls per message")
    assert _answer(whole, whole_error)
    assert [f.result().status for f in whole.futures] == ["INVALID_ARGUMENT", "INVALID_ARGUMENT"]
    assert failure_of("no status here") == TranslateFailure("UNKNOWN", "no status here")


def _established_to(port: int) -> int:
    """TCP connections in state ESTABLISHED whose remote port is `port` (/proc/net/tcp and tcp6)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


@pytest.mark.parametrize("tls", ["on", "off"])
async def test_each_stream_rides_its_own_connection(sip_stack_factory: SipStackFactory, tls: str) -> None:
    """NUMPROTECT_SIP_STREAMS=3 through the adapter's own build: three HTTP/2 connections reach translation, so an
    L4 balancer spreads the streams. (grpc shares one connection between channels of equal target, options and
    credentials: with TLS each channel's credentials object differs anyway; on plaintext only the adapter's channel
    option keeps them apart: without it, 1 connection.)"""
    tls_env = {"NUMPROTECT_TLS": tls, "NUMPROTECT_AUTH": "on" if tls == "on" else "off"}
    async with sip_stack_factory(adapter={"NUMPROTECT_SIP_STREAMS": "3", **tls_env}, translation=tls_env) as stack:
        await _until(lambda: stack.adapter_metric("numprotect_sip_translation_streams") == 3.0, 10.0)
        assert _established_to(stack.proxy.port) == 3  # the adapter's side
        assert _established_to(stack.translation.port) == 3  # translation's side (the proxy's upstreams)


async def test_a_call_id_beyond_translations_rule_still_connects(sip_stack: SipStack) -> None:
    """A legal SIP Call-ID of 200 characters (translation takes at most 128): the call is translated without it and
    gets its 302, the Call-ID echoed in full."""
    await sip_stack.bind_axb(SIP_A, SIP_B)
    call_id = "c" * 190 + "@10.0.0.1"
    invite = request(uri=f"sip:{SIP_X}@127.0.0.1", caller=SIP_A, call_id=call_id)
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        await loop.sock_sendto(sock, invite, sip_stack.sip_address)
        async with asyncio.timeout(10):
            while status(response := await loop.sock_recv(sock, 65535)) < 200:
                pass
    assert status(response) == 302, response
    assert header(response, "Contact") == f"<sip:{SIP_B}@{sip_stack.egress};user=phone>"
    assert header(response, "Call-ID") == call_id
