"""Messages at the receive limit (NUMPROTECT_MAX_RECEIVE_MESSAGE_BYTES, 4 MiB by default) for every RPC: exactly at
the limit the message is read and answered on its merits; one byte more is RESOURCE_EXHAUSTED, never INTERNAL.

The padding is an unknown field (number 1000, length-delimited) after a valid request, which a server must skip, or
the request's first string field made long enough (answered INVALID_ARGUMENT naming it, or on its merits).
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from fuzz.contracts import FORBIDDEN, Rpc, all_rpcs, call, problems
from fuzz.platform import Platform
from fuzz.requests import VALID
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from numprotect.core.settings import ServerSettings

LIMIT = ServerSettings.max_receive_message_bytes
RPCS = all_rpcs()
# The RPCs whose request has a string field at the top, which the second test lengthens.
WITH_STRING = [
    r for r in RPCS if any(f.type == FieldDescriptor.TYPE_STRING and not f.is_repeated for f in r.input.fields)
]


def varint(value: int) -> bytes:
    """Protobuf's base-128 varint."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


_PADDING_TAG = varint((1000 << 3) | 2)  # field 1000, length-delimited: unknown to every request


def padded(message: Message, size: int) -> bytes:
    """`message` serialized with an unknown field appended so that the whole is exactly `size` bytes."""
    body = message.SerializeToString()
    length = size - len(body) - len(_PADDING_TAG)
    while len(body) + len(_PADDING_TAG) + len(varint(length)) + length != size:
        length -= 1
    return body + _PADDING_TAG + varint(length) + b"\x00" * length


def with_long_string(message: Message, size: int) -> Message | None:
    """`message` with its first string field long enough that it serializes to exactly `size` bytes (None when it
    has no string field at the top)."""
    field = next((f for f in message.DESCRIPTOR.fields if f.type == FieldDescriptor.TYPE_STRING), None)
    if field is None or field.is_repeated:
        return None
    changed = type(message)()
    changed.CopyFrom(message)
    length = size
    while True:
        setattr(changed, field.name, "9" * length)
        over = changed.ByteSize() - size
        if over == 0:
            return changed
        length -= max(1, over) if over > 0 else -1


def first_message(rpc: Rpc, platform: Platform) -> Message:
    base = VALID[rpc.name](platform)
    message: Message = base[0] if isinstance(base, list) else base
    return message


def as_request(rpc: Rpc, payload: Any) -> Any:
    return [payload] if rpc.method.client_streaming else payload


def caller(rpc: Rpc) -> Any:
    return next(r for r in rpc.roles if r.name in ("TENANT", "CARRIER", "SERVICE", "OPERATOR"))


@pytest.mark.parametrize("rpc", RPCS, ids=lambda r: r.name)
def test_one_byte_over_the_limit_is_resource_exhausted(platform: Platform, rpc: Rpc) -> None:
    channel = platform.channel(rpc.process, caller(rpc))
    at_limit = call(channel, rpc, as_request(rpc, padded(first_message(rpc, platform), LIMIT)))
    assert at_limit.code not in FORBIDDEN | {grpc.StatusCode.RESOURCE_EXHAUSTED}, (at_limit.code, at_limit.details)
    over = call(channel, rpc, as_request(rpc, padded(first_message(rpc, platform), LIMIT + 1)))
    assert over.code == grpc.StatusCode.RESOURCE_EXHAUSTED, (over.code, over.details)


@pytest.mark.parametrize("process", ["allocation", "translation"])
def test_memory_stays_bounded_under_messages_at_the_limit(platform: Platform, process: str) -> None:
    """Thirty more 4-MiB messages after ten (the allocator's working set) add far less than the 120 MiB they carry:
    nothing of a refused or answered message is kept (an aio and the thread-pool server)."""
    rpc = next(r for r in RPCS if r.process == process and r.kind == "unary" and r.input.fields)
    channel = platform.channel(process, caller(rpc))
    for i in range(10):
        call(channel, rpc, padded(first_message(rpc, platform), LIMIT + i % 2))
    before = platform.rss()[process]
    for i in range(30):
        answer = call(channel, rpc, padded(first_message(rpc, platform), LIMIT + i % 2))
        assert answer.code not in FORBIDDEN, answer
    grown = platform.rss()[process] - before
    assert grown < 64 * 1024 * 1024, f"{process} kept {grown / 2**20:.0f} MiB of 30 messages of 4 MiB"


def test_allocation_memory_stays_bounded_under_refused_long_strings(platform: Platform) -> None:
    """Found by the size-limit cases (allocation +306 MB after its 4-MiB string fields): a call the aio call layer
    answers with an error kept its request until the next garbage collection (the abort's traceback holds the call
    layer's frame, whose locals hold the request, and grpcio keeps that exception on the call: a cycle), and so does
    every unary call whose request grpcio's stream reader still held (its suspended generator). With gc.freeze and a
    young threshold of 10,000 a collection comes every few hundred calls: 300 such calls grew allocation by 2.4 GB.
    Forty refused 4-MiB strings after ten must add less than 64 MiB."""
    rpc = next(r for r in WITH_STRING if r.name == "AllocationService.GetNumber")
    channel = platform.channel(rpc.process, caller(rpc))
    message = with_long_string(first_message(rpc, platform), LIMIT)
    assert message is not None
    for _ in range(10):
        call(channel, rpc, message)
    before = platform.rss()["allocation"]
    for _ in range(40):
        answer = call(channel, rpc, message)
        assert answer.code == grpc.StatusCode.INVALID_ARGUMENT, (answer.code, answer.details[:300])
    grown = platform.rss()["allocation"] - before
    assert grown < 64 * 1024 * 1024, f"allocation kept {grown / 2**20:.0f} MiB of 40 refused 4-MiB requests"


@pytest.mark.parametrize("rpc", WITH_STRING, ids=lambda r: r.name)
def test_a_string_as_long_as_the_limit_allows_is_answered_on_its_merits(platform: Platform, rpc: Rpc) -> None:
    message = with_long_string(first_message(rpc, platform), LIMIT)
    assert message is not None and message.ByteSize() == LIMIT
    answer = call(platform.channel(rpc.process, caller(rpc)), rpc, as_request(rpc, message))
    assert not problems(rpc, answer), (problems(rpc, answer), answer.code, answer.details[:300])
    assert answer.code != grpc.StatusCode.RESOURCE_EXHAUSTED, answer.details[:300]
    # Alive and SERVING; the memory these strings leave is judged by the test above, not by the fuzz run's budget.
    assert not platform.unhealthy(), platform.unhealthy()
