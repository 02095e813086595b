"""Domain errors become precise status codes with google.rpc details; Redis outages become UNAVAILABLE."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from redis.exceptions import ConnectionError as RedisConnectionError

from numprotect.core.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from numprotect.core.interceptors import ErrorMappingInterceptor

SERVICE = "test.Errors"


def _handlers(raise_this: list[BaseException]) -> grpc.GenericRpcHandler:
    async def unary(request: bytes, context: Any) -> bytes:
        raise raise_this[0]

    async def server_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield b"first"
        raise raise_this[0]

    identity = {"request_deserializer": None, "response_serializer": None}
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary, **identity),
            "Stream": grpc.unary_stream_rpc_method_handler(server_stream, **identity),
        },
    )


@pytest.fixture
async def channel_and_error() -> AsyncIterator[tuple[grpc.aio.Channel, list[BaseException]]]:
    raise_this: list[BaseException] = [RuntimeError()]
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()], options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((_handlers(raise_this),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel, raise_this
    await server.stop(0)


async def _call_unary(channel: grpc.aio.Channel) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        method: Any = channel.unary_unary(f"/{SERVICE}/Unary")  # type: ignore[call-arg]
        await method(b"")
    return info.value


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (
            NotFound("binding b1 not found", resource_type="binding", resource_name="b1"),
            grpc.StatusCode.NOT_FOUND,
        ),
        (AlreadyExists("order o1 exists with other parties"), grpc.StatusCode.ALREADY_EXISTS),
        (
            FailedPrecondition("user_consent must be true", subject="user_consent"),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        (
            ResourceExhausted("no number left for tenant t1 in 010", subject="t1/010"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
    ],
)
async def test_domain_errors_map_to_their_code(
    channel_and_error: tuple[grpc.aio.Channel, list[BaseException]], error: DomainError, code: grpc.StatusCode
) -> None:
    channel, raise_this = channel_and_error
    raise_this[0] = error
    failure = await _call_unary(channel)
    assert failure.code() == code
    assert failure.details() == error.message


async def test_invalid_argument_carries_bad_request_field_violations(
    channel_and_error: tuple[grpc.aio.Channel, list[BaseException]],
) -> None:
    channel, raise_this = channel_and_error
    raise_this[0] = InvalidArgument(
        [FieldViolation("party_a", "is required"), FieldViolation("ttl", "must be between 60s and 90d")]
    )
    failure = await _call_unary(channel)
    assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(failure)  # type: ignore[arg-type]
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("party_a", "is required"),
        ("ttl", "must be between 60s and 90d"),
    ]


async def test_redis_outage_is_unavailable_and_bugs_are_internal(
    channel_and_error: tuple[grpc.aio.Channel, list[BaseException]],
) -> None:
    channel, raise_this = channel_and_error
    raise_this[0] = RedisConnectionError("connection refused")
    assert (await _call_unary(channel)).code() == grpc.StatusCode.UNAVAILABLE
    raise_this[0] = KeyError("bug")
    failure = await _call_unary(channel)
    assert failure.code() == grpc.StatusCode.INTERNAL
    assert "bug" not in (failure.details() or "")


async def test_errors_in_server_streams_are_mapped_after_earlier_messages(
    channel_and_error: tuple[grpc.aio.Channel, list[BaseException]],
) -> None:
    channel, raise_this = channel_and_error
    raise_this[0] = NotFound("cursor expired")
    method: Any = channel.unary_stream(f"/{SERVICE}/Stream")  # type: ignore[call-arg]
    call = method(b"")
    received = [message async for message in _until_error(call)]
    assert received == [b"first"]
    assert await call.code() == grpc.StatusCode.NOT_FOUND


async def _until_error(call: Any) -> AsyncIterator[bytes]:
    try:
        async for message in call:
            yield message
    except grpc.aio.AioRpcError:
        return
