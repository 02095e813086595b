"""Limits against a hostile caller: each triggers with its precise status naming its setting, and the service stays
healthy afterwards (Health SERVING, a normal Translate answered)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from numprotect.core.routes import MODE_AXN
from numprotect.translation.v1 import translation_pb2 as pb

X = "700100000000001"
A = "13800000001"
SPAMMER = "13700000003"


def _call(call_id: str, caller: str = SPAMMER) -> pb.TranslateRequest:
    return pb.TranslateRequest(call_id=call_id, calling_number=caller, called_number=X)


async def _healthy(tr: Any) -> None:
    health = health_pb2_grpc.HealthStub(tr.service.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    answer = await tr.translate(SPAMMER, deadline=5)
    assert (answer.decision, answer.target_number) == (pb.DECISION_CONNECT, A)


async def test_a_message_with_too_many_calls_gets_one_error_and_the_stream_goes_on(translation_factory: Any) -> None:
    tr = await translation_factory({"NUMPROTECT_TRANSLATION_STREAM_MAX_REQUESTS": "5"})
    await tr.put(tr.route("n1", MODE_AXN))

    async def send() -> AsyncIterator[pb.TranslateStreamRequest]:
        yield pb.TranslateStreamRequest(requests=[_call(f"big-{i}") for i in range(6)])
        yield pb.TranslateStreamRequest(requests=[_call(f"ok-{i}") for i in range(5)])

    call = tr.stub.TranslateStream(send())
    answers = [answer async for answer in call]
    assert await call.code() == grpc.StatusCode.OK
    too_big, fine = answers
    assert too_big.error == (
        "INVALID_ARGUMENT: requests: at most 5 calls per message (NUMPROTECT_TRANSLATION_STREAM_MAX_REQUESTS)"
    )
    assert list(too_big.responses) == []
    assert [r.response.target_number for r in fine.responses] == [A] * 5
    await _healthy(tr)


async def test_open_streams_beyond_the_limit_are_resource_exhausted_and_unary_still_answers(
    translation_factory: Any,
) -> None:
    tr = await translation_factory({"NUMPROTECT_TRANSLATION_WORKERS": "4", "NUMPROTECT_TRANSLATION_MAX_STREAMS": "2"})
    await tr.put(tr.route("n1", MODE_AXN))
    outgoing: list[asyncio.Queue[pb.TranslateStreamRequest | None]] = []
    calls = []

    def open_stream() -> Any:
        queue: asyncio.Queue[pb.TranslateStreamRequest | None] = asyncio.Queue()

        async def send() -> AsyncIterator[pb.TranslateStreamRequest]:
            while (message := await queue.get()) is not None:
                yield message

        outgoing.append(queue)
        call = tr.stub.TranslateStream(send())
        calls.append(call)
        return call

    for index in range(2):
        call = open_stream()
        await outgoing[index].put(pb.TranslateStreamRequest(request=_call(f"s{index}")))
        assert (await call.read()).response.target_number == A  # open and served
    refused = open_stream()
    assert await asyncio.wait_for(refused.code(), 10) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "NUMPROTECT_TRANSLATION_MAX_STREAMS" in (await refused.details() or "")
    await _healthy(tr)  # the workers beyond the streams still answer unary calls

    await outgoing[0].put(None)  # one stream closes: its slot is free again
    assert await calls[0].code() == grpc.StatusCode.OK
    again = open_stream()
    await outgoing[-1].put(pb.TranslateStreamRequest(request=_call("again")))
    assert (await again.read()).response.target_number == A
    for queue in (outgoing[1], outgoing[-1]):
        await queue.put(None)
    assert await calls[1].code() == await again.code() == grpc.StatusCode.OK


async def test_a_client_that_does_not_read_is_pushed_back_not_buffered(translation_factory: Any) -> None:
    """The client offers far more than the stream queue and the HTTP/2 windows hold and reads nothing: the
    service stops reading, so the client's sends stop (flow control); once it reads, every call is answered."""
    per_message = 50
    tr = await translation_factory(
        {
            "NUMPROTECT_TRANSLATION_STREAM_MAX_REQUESTS": str(per_message),
            "NUMPROTECT_TRANSLATION_STREAM_QUEUE": str(per_message),
            "NUMPROTECT_TRANSLATION_RATE_PER_CALLER": "0",  # 50,000 calls of one binding: no rate limit
            "NUMPROTECT_TRANSLATION_RATE_PER_BINDING": "0",
            "NUMPROTECT_TRANSLATION_REDIS_TIMEOUT": "3s",  # the test's own load shares the two cores
        }
    )
    await tr.put(tr.route("n1", MODE_AXN))
    # Messages of about 9 kB, answered with as much (the call ids come back): 22 MB if nothing pushed back. The
    # call ids are as long as their rule allows (128 visible ASCII characters, that of the CDR).
    offered = 2500
    sent = 0

    async def send() -> AsyncIterator[pb.TranslateStreamRequest]:
        nonlocal sent
        for index in range(offered):
            calls = [_call(f"{index}-{i}-".ljust(128, "p")) for i in range(per_message)]
            yield pb.TranslateStreamRequest(requests=calls)
            sent += 1

    call = tr.stub.TranslateStream(send(), timeout=120)
    previous = -1
    deadline = time.monotonic() + 30
    while sent != previous:  # until the client's sends stall
        assert time.monotonic() < deadline, "the client's sends never stalled"
        previous = sent
        await asyncio.sleep(1.0)
    stalled_at = sent
    assert stalled_at < offered // 2, f"{stalled_at} of {offered} messages taken without a read"
    await _healthy(tr)  # meanwhile the process answers other calls

    answered = 0
    async for answer in call:
        assert [r.response.target_number for r in answer.responses] == [A] * per_message
        answered += 1
    assert (answered, await call.code()) == (offered, grpc.StatusCode.OK)


async def test_blocklist_limits(translation_factory: Any) -> None:
    tr = await translation_factory(
        {
            "NUMPROTECT_TRANSLATION_BLOCKLIST_MAX_ENTRIES": "3",
            "NUMPROTECT_TRANSLATION_BLOCKLIST_PAGE_MAX": "2",
            "NUMPROTECT_TRANSLATION_BLOCK_REASON_MAX": "10",
        }
    )
    await tr.put(tr.route("n1", MODE_AXN))
    tenant = tr.tenant("t1")
    numbers = [f"1370000100{i}" for i in range(4)]
    for number in numbers[:3]:
        await tenant.BlockCaller(pb.BlockCallerRequest(calling_number=number))
    await tenant.BlockCaller(pb.BlockCallerRequest(calling_number=numbers[0], reason="replaced"))  # not a new one

    async def refused(call: Any, code: grpc.StatusCode, setting: str) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == code
        assert setting in (info.value.details() or "")

    full = tenant.BlockCaller(pb.BlockCallerRequest(calling_number=numbers[3]))
    await refused(full, grpc.StatusCode.RESOURCE_EXHAUSTED, "NUMPROTECT_TRANSLATION_BLOCKLIST_MAX_ENTRIES")
    other_tenant = tr.tenant("t2")  # a list of its own: not full
    await other_tenant.BlockCaller(pb.BlockCallerRequest(calling_number=numbers[3]))
    long_reason = tenant.BlockCaller(pb.BlockCallerRequest(calling_number=numbers[1], reason="x" * 11))
    await refused(long_reason, grpc.StatusCode.INVALID_ARGUMENT, "NUMPROTECT_TRANSLATION_BLOCK_REASON_MAX")
    big_page = tenant.ListBlockedCallers(pb.ListBlockedCallersRequest(page_size=3))
    await refused(big_page, grpc.StatusCode.INVALID_ARGUMENT, "NUMPROTECT_TRANSLATION_BLOCKLIST_PAGE_MAX")

    # The default page is the largest allowed; the list is intact; after an unblock there is room again.
    page = await tenant.ListBlockedCallers(pb.ListBlockedCallersRequest())
    assert [e.calling_number for e in page.entries] == numbers[:2] and page.next_page_token
    await tenant.UnblockCaller(pb.UnblockCallerRequest(calling_number=numbers[2]))
    await tenant.BlockCaller(pb.BlockCallerRequest(calling_number=numbers[3]))
    await _healthy(tr)
