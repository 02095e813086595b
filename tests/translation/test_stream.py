"""TranslateStream: one long stream, responses matched by call_id, per-message errors keep the stream open."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from numprotect.core.routes import MODE_AXN
from numprotect.translation.v1 import translation_pb2 as pb

X_AXB = "700100000000001"
X_AXN = "700100000000002"
A = "13800000001"
B = "13900000002"


def _request(call_id: str, caller: str, called: str) -> pb.TranslateStreamRequest:
    return pb.TranslateStreamRequest(
        request=pb.TranslateRequest(call_id=call_id, calling_number=caller, called_number=called)
    )


async def test_stream_answers_every_request_by_call_id_and_keeps_going_after_errors(tr: Any) -> None:
    await tr.put(tr.route("b1"), X_AXB)
    await tr.put(tr.route("n1", MODE_AXN), X_AXN)
    expected: dict[str, tuple[str, str]] = {}
    requests = []
    for i in range(600):
        kind = i % 4
        call_id = f"call-{i}"
        if kind == 0:
            requests.append(_request(call_id, A, X_AXB))
            expected[call_id] = ("connect", B)
        elif kind == 1:
            requests.append(_request(call_id, B, X_AXB))
            expected[call_id] = ("connect", A)
        elif kind == 2:
            requests.append(_request(call_id, f"1370000{i:04d}", X_AXN))
            expected[call_id] = ("connect", A)
        else:
            requests.append(_request(call_id, A, "not-a-number"))
            expected[call_id] = ("error", "INVALID_ARGUMENT: called_number")

    async def send() -> AsyncIterator[pb.TranslateStreamRequest]:
        for index, request in enumerate(requests):
            yield request
            if index % 50 == 0:
                await asyncio.sleep(0)  # let some requests arrive while a batch is in Redis

    seen: dict[str, Any] = {}
    async for message in tr.stub.TranslateStream(send()):
        assert message.call_id not in seen
        seen[message.call_id] = message
    assert set(seen) == set(expected)
    for call_id, (expected_kind, value) in expected.items():
        message = seen[call_id]
        if expected_kind == "error":
            assert message.error.startswith(value) and not message.HasField("response")
        else:
            assert not message.error
            assert message.response.decision == pb.DECISION_CONNECT
            assert (message.response.target_number, message.response.call_id) == (value, call_id)


async def test_stream_requests_are_answered_while_the_stream_stays_open(tr: Any) -> None:
    """A switch adapter sends one call and waits for its answer before sending the next."""
    await tr.put(tr.route("b1"), X_AXB)
    outgoing: asyncio.Queue[pb.TranslateStreamRequest | None] = asyncio.Queue()

    async def send() -> AsyncIterator[pb.TranslateStreamRequest]:
        while (request := await outgoing.get()) is not None:
            yield request

    call = tr.stub.TranslateStream(send())
    for i in range(5):
        await outgoing.put(_request(f"c{i}", A if i % 2 else B, X_AXB))
        answer = await call.read()
        assert answer.call_id == f"c{i}"
        assert answer.response.target_number == (B if i % 2 else A)
    await outgoing.put(None)
    assert await call.code() == grpc.StatusCode.OK


async def test_a_batched_message_is_answered_by_one_message_in_order(tr: Any) -> None:
    await tr.put(tr.route("b1"), X_AXB)
    await tr.put(tr.route("n1", MODE_AXN), X_AXN)
    batch = [
        pb.TranslateRequest(call_id="m1", calling_number=A, called_number=X_AXB),
        pb.TranslateRequest(call_id="m2", calling_number="13700000009", called_number=X_AXN),
        pb.TranslateRequest(call_id="m3", calling_number=A, called_number="bad"),
        pb.TranslateRequest(call_id="m4", calling_number="13700000009", called_number=X_AXB),
    ]

    async def send() -> AsyncIterator[pb.TranslateStreamRequest]:
        yield pb.TranslateStreamRequest(requests=batch)
        yield _request("single", B, X_AXB)

    answers = [message async for message in tr.stub.TranslateStream(send())]
    batched = next(m for m in answers if m.responses)
    assert [r.call_id for r in batched.responses] == ["m1", "m2", "m3", "m4"]
    assert batched.responses[0].response.target_number == B
    assert batched.responses[1].response.target_number == A
    assert batched.responses[2].error.startswith("INVALID_ARGUMENT: called_number")
    assert batched.responses[3].response.reject_reason == pb.REJECT_REASON_NO_BINDING
    single = next(m for m in answers if m.call_id == "single")
    assert single.response.target_number == A and not single.responses
