"""The one call layer (numprotect.core.calls) on both server models.

Domain errors become precise status codes with google.rpc details; Redis outages become UNAVAILABLE; bugs become
INTERNAL without their text; concerns enter in order and leave in reverse with the call's final status; a concern
that refuses a call ends it before the servicer runs; health and reflection pass through untouched.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from redis.exceptions import ConnectionError as RedisConnectionError

from numprotect.core.calls import AioCallLayer, CallConcern, Method, SyncCallLayer
from numprotect.core.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from support.call_layer import AIO_MODELS, add_methods, aio_server

SERVICE = "test.Errors"
SLOW_SECONDS = 0.6
OPTIONS = [("grpc.so_reuseport", 0)]


@dataclass
class Recorder:
    """A concern that logs what it sees; `refuse` makes `enter` raise it."""

    events: list[str] = field(default_factory=list)
    refuse: DomainError | None = None
    tag: str = "r"

    def for_method(self, method: Method) -> Recorder._Bound:
        return Recorder._Bound(self, method)

    @dataclass
    class _Bound:
        recorder: Recorder
        method: Method

        def enter(self, context: Any, request: Any = None) -> object:
            self.recorder.events.append(f"{self.recorder.tag}:enter {self.method.name}")
            if self.recorder.refuse is not None:
                raise self.recorder.refuse
            return self.method.name

        def leave(self, state: object, context: Any) -> None:
            code = context.code()
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            self.recorder.events.append(f"{self.recorder.tag}:leave {state} {name}")


@dataclass
class Server:
    channel: grpc.aio.Channel
    raise_this: list[BaseException]
    called: list[str]
    recorders: tuple[Recorder, Recorder]
    model: str


def _aio_handlers(raise_this: list[BaseException], called: list[str]) -> dict[str, grpc.RpcMethodHandler]:
    async def unary(request: bytes, context: Any) -> bytes:
        called.append("Unary")
        raise raise_this[0]

    async def server_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        called.append("Stream")
        yield b"first"
        raise raise_this[0]

    async def aborting(request: bytes, context: Any) -> bytes:
        await context.abort(grpc.StatusCode.OUT_OF_RANGE, "aborted by the servicer")
        raise AssertionError("abort returned")

    async def slow(request: bytes, context: Any) -> bytes:
        await asyncio.sleep(SLOW_SECONDS)
        return b"late"

    return _methods(unary, server_stream, aborting, slow)


def _sync_handlers(raise_this: list[BaseException], called: list[str]) -> dict[str, grpc.RpcMethodHandler]:
    def unary(request: bytes, context: Any) -> bytes:
        called.append("Unary")
        raise raise_this[0]

    def server_stream(request: bytes, context: Any) -> Iterator[bytes]:
        called.append("Stream")
        yield b"first"
        raise raise_this[0]

    def aborting(request: bytes, context: Any) -> bytes:
        context.abort(grpc.StatusCode.OUT_OF_RANGE, "aborted by the servicer")
        raise AssertionError("abort returned")

    def slow(request: bytes, context: Any) -> bytes:
        time.sleep(SLOW_SECONDS)  # a thread-pool servicer runs to its end even when its client is gone
        return b"late"

    return _methods(unary, server_stream, aborting, slow)


def _methods(unary: Any, server_stream: Any, aborting: Any, slow: Any) -> dict[str, grpc.RpcMethodHandler]:
    identity = {"request_deserializer": None, "response_serializer": None}
    return {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, **identity),
        "Stream": grpc.unary_stream_rpc_method_handler(server_stream, **identity),
        "Abort": grpc.unary_unary_rpc_method_handler(aborting, **identity),
        "Slow": grpc.unary_unary_rpc_method_handler(slow, **identity),
    }


@pytest.fixture(params=[*AIO_MODELS, "sync"])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    """ "aio": the layer as a grpc.aio interceptor; "aio-installed": wrapped at registration (`AioCallLayer.install`,
    what AioServiceApp serves with)."""
    raise_this: list[BaseException] = [RuntimeError()]
    called: list[str] = []
    events: list[str] = []
    recorders = (Recorder(events, tag="outer"), Recorder(events, tag="inner"))
    concerns: list[CallConcern] = list(recorders)
    if request.param.startswith("aio"):
        aio = aio_server(request.param, concerns, OPTIONS)
        add_methods(aio, SERVICE, _aio_handlers(raise_this, called))
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), aio)  # type: ignore[attr-defined]
        port = aio.add_insecure_port("127.0.0.1:0")
        await aio.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Server(channel, raise_this, called, recorders, "aio")
        await aio.stop(0)
    else:
        sync = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4), interceptors=[SyncCallLayer(concerns)], options=OPTIONS
        )
        add_methods(sync, SERVICE, _sync_handlers(raise_this, called))
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), sync)
        port = sync.add_insecure_port("127.0.0.1:0")
        sync.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Server(channel, raise_this, called, recorders, "sync")
        sync.stop(0).wait()


async def _left(server: Server, leaves: int = 2) -> list[str]:
    """The recorded events once `leaves` concerns have left. On grpc.aio a call that ends by an exception has its
    status sent by the abort before the layer's `finally` runs the concerns' `leave`, and the client shares the
    test's event loop: it may read the status first (2 failures in ~6 runs on a loaded box). Bounded wait."""
    events = server.recorders[0].events
    for _ in range(500):
        if sum(":leave " in event for event in events) >= leaves:
            break
        await asyncio.sleep(0.01)
    return events


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
async def test_domain_errors_map_to_their_code(server: Server, error: DomainError, code: grpc.StatusCode) -> None:
    channel, raise_this = server.channel, server.raise_this
    raise_this[0] = error
    failure = await _call_unary(channel)
    assert failure.code() == code
    assert failure.details() == error.message


async def test_invalid_argument_carries_bad_request_field_violations(
    server: Server,
) -> None:
    channel, raise_this = server.channel, server.raise_this
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
    server: Server,
) -> None:
    channel, raise_this = server.channel, server.raise_this
    raise_this[0] = RedisConnectionError("connection refused")
    assert (await _call_unary(channel)).code() == grpc.StatusCode.UNAVAILABLE
    raise_this[0] = KeyError("bug")
    failure = await _call_unary(channel)
    assert failure.code() == grpc.StatusCode.INTERNAL
    assert "bug" not in (failure.details() or "")


async def test_errors_in_server_streams_are_mapped_after_earlier_messages(
    server: Server,
) -> None:
    channel, raise_this = server.channel, server.raise_this
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


async def test_concerns_enter_in_order_and_leave_in_reverse_with_the_final_status(server: Server) -> None:
    server.raise_this[0] = NotFound("binding b1 not found")
    await _call_unary(server.channel)
    assert await _left(server) == [
        "outer:enter Unary",
        "inner:enter Unary",
        "inner:leave Unary NOT_FOUND",
        "outer:leave Unary NOT_FOUND",
    ]


async def test_concerns_wrap_a_whole_stream(server: Server) -> None:
    server.raise_this[0] = NotFound("cursor expired")
    method: Any = server.channel.unary_stream(f"/{SERVICE}/Stream")  # type: ignore[call-arg]
    call = method(b"")
    assert [message async for message in _until_error(call)] == [b"first"]
    assert await call.code() == grpc.StatusCode.NOT_FOUND
    assert (await _left(server))[-2:] == ["inner:leave Stream NOT_FOUND", "outer:leave Stream NOT_FOUND"]


async def test_a_concern_that_refuses_ends_the_call_before_the_servicer(server: Server) -> None:
    server.recorders[1].refuse = InvalidArgument.field("authorization", "must be a bearer token")
    failure = await _call_unary(server.channel)
    assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert server.called == []
    # The refusing concern never entered, so only the outer one leaves, with the refusal's status.
    assert await _left(server, 1) == [
        "outer:enter Unary",
        "inner:enter Unary",
        "outer:leave Unary INVALID_ARGUMENT",
    ]


async def test_a_servicer_that_aborts_keeps_its_own_status(server: Server) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        method: Any = server.channel.unary_unary(f"/{SERVICE}/Abort")  # type: ignore[call-arg]
        await method(b"")
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert info.value.details() == "aborted by the servicer"
    assert (await _left(server))[-1] == "outer:leave Abort OUT_OF_RANGE"


async def test_a_call_the_client_abandons_leaves_cancelled_or_deadline_exceeded_never_ok(server: Server) -> None:
    """The concerns (metrics, the audit trail) see why a call ended without an answer, on both server models."""
    method: Any = server.channel.unary_unary(f"/{SERVICE}/Slow")  # type: ignore[call-arg]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await method(b"", timeout=0.1)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert (await _left(server))[-1] == "outer:leave Slow DEADLINE_EXCEEDED"
    call = method(b"")
    await asyncio.sleep(0.1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert (await _left(server, 4))[-1] == "outer:leave Slow CANCELLED"


async def test_health_passes_through_the_layer_untouched(server: Server) -> None:
    stub = health_pb2_grpc.HealthStub(server.channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert server.recorders[0].events == []


def test_a_non_blocking_handler_cannot_be_wrapped() -> None:
    def watch(request: Any, context: Any, send_response_callback: Any = None) -> None:
        return None

    watch.experimental_non_blocking = True  # type: ignore[attr-defined]
    handler = grpc.unary_stream_rpc_method_handler(watch)
    details = type("Details", (), {"method": "/test.Stream/Watch", "invocation_metadata": ()})()
    with pytest.raises(TypeError, match="non-blocking"):
        SyncCallLayer([]).intercept_service(lambda _: handler, details)  # type: ignore[arg-type]


def test_the_thread_pool_layer_is_thread_safe_for_concurrent_first_calls() -> None:
    layer = SyncCallLayer([])
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    details = type("Details", (), {"method": "/test.Errors/Unary", "invocation_metadata": ()})()
    wrapped: list[Any] = []
    threads = [
        threading.Thread(target=lambda: wrapped.append(layer.intercept_service(lambda _: handler, details)))  # type: ignore[arg-type]
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(wrapped) == 8 and all(w is not None and w.unary_unary is not None for w in wrapped)


async def test_an_installed_layer_wraps_generic_only_services_and_leaves_unknown_methods_unimplemented() -> None:
    """`AioCallLayer.install`: a service added as a generic handler only (no registered methods) passes through the
    concerns as registered ones do; a method nobody serves is grpc.aio's own UNIMPLEMENTED, with no concern run."""
    events: list[str] = []
    server = AioCallLayer([Recorder(events)]).install(grpc.aio.server(options=OPTIONS))

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    handlers = {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.GenericOnly", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for _ in range(2):  # the second call finds the handler wrapped by the first
                echo_call: Any = channel.unary_unary("/test.GenericOnly/Echo")  # type: ignore[call-arg]
                assert await echo_call(b"ping") == b"ping"
            missing: Any = channel.unary_unary("/test.GenericOnly/Missing")  # type: ignore[call-arg]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await missing(b"")
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert events == ["r:enter Echo", "r:leave Echo None"] * 2  # no code set yet: the call is ending well
    finally:
        await server.stop(0)
