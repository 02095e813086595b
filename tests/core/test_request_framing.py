"""Requests the call layer cannot decode, on both server models (numprotect.core.calls, "Framing").

A message whose bytes are no protobuf of the request type answers INVALID_ARGUMENT naming "request" and the type
(google.rpc.BadRequest), never grpcio's UNKNOWN (grpc.aio) or INTERNAL (thread-pool server), on unary and streaming
requests, and the servicer never sees it. A unary call whose stream ends without a complete message (a length prefix
announcing more bytes than came, a prefix cut short, no message at all) is answered at once: INVALID_ARGUMENT by the
layer on grpc.aio (which by itself never answered it and left the stream open), UNIMPLEMENTED by grpcio's
thread-pool server before the layer runs. Sent with a generic client (raw bytes) and with raw HTTP/2 frames (h2).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from google.protobuf.wrappers_pb2 import StringValue
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from numprotect.core.calls import CallConcern, Method, SyncCallLayer
from support.call_layer import AIO_MODELS, add_methods, aio_server

SERVICE = "test.Framing"
REQUEST_TYPE = "google.protobuf.StringValue"
NOT_PROTOBUF = b"\xff\xff\xff\xff\x0f"  # a varint longer than 64 bits: no message parses it
OPTIONS = [("grpc.so_reuseport", 0)]
ANSWER_SECONDS = 5.0


@dataclass
class Seen:
    """What the servicer received, and the request each concern was given."""

    requests: list[str] = field(default_factory=list)
    given: list[Any] = field(default_factory=list)
    left: list[str] = field(default_factory=list)

    def for_method(self, method: Method) -> Seen:
        return self

    def enter(self, context: Any, request: Any = None) -> object:
        self.given.append(request)
        return None

    def leave(self, state: object, context: Any) -> None:
        code = context.code()
        self.left.append(code.name if isinstance(code, grpc.StatusCode) else str(code))


def _handlers(unary: Any, server_stream: Any, client_stream: Any, bidi: Any) -> dict[str, grpc.RpcMethodHandler]:
    kinds = {
        "Unary": (grpc.unary_unary_rpc_method_handler, unary),
        "ServerStream": (grpc.unary_stream_rpc_method_handler, server_stream),
        "ClientStream": (grpc.stream_unary_rpc_method_handler, client_stream),
        "Bidi": (grpc.stream_stream_rpc_method_handler, bidi),
    }
    return {
        name: kind(
            behavior,
            request_deserializer=StringValue.FromString,
            response_serializer=StringValue.SerializeToString,
        )
        for name, (kind, behavior) in kinds.items()
    }


def _aio_handlers(seen: Seen) -> dict[str, grpc.RpcMethodHandler]:
    async def unary(request: StringValue, context: Any) -> StringValue:
        seen.requests.append(request.value)
        return StringValue(value=f"ok {request.value}")

    async def server_stream(request: StringValue, context: Any) -> AsyncIterator[StringValue]:
        seen.requests.append(request.value)
        yield StringValue(value=f"ok {request.value}")

    async def client_stream(requests: AsyncIterator[StringValue], context: Any) -> StringValue:
        async for request in requests:
            seen.requests.append(request.value)
        return StringValue(value=f"ok {len(seen.requests)}")

    async def bidi(requests: AsyncIterator[StringValue], context: Any) -> AsyncIterator[StringValue]:
        async for request in requests:
            seen.requests.append(request.value)
            yield StringValue(value=f"ok {request.value}")

    return _handlers(unary, server_stream, client_stream, bidi)


def _sync_handlers(seen: Seen) -> dict[str, grpc.RpcMethodHandler]:
    def unary(request: StringValue, context: Any) -> StringValue:
        seen.requests.append(request.value)
        return StringValue(value=f"ok {request.value}")

    def server_stream(request: StringValue, context: Any) -> Iterator[StringValue]:
        seen.requests.append(request.value)
        yield StringValue(value=f"ok {request.value}")

    def client_stream(requests: Iterator[StringValue], context: Any) -> StringValue:
        for request in requests:
            seen.requests.append(request.value)
        return StringValue(value=f"ok {len(seen.requests)}")

    def bidi(requests: Iterator[StringValue], context: Any) -> Iterator[StringValue]:
        for request in requests:
            seen.requests.append(request.value)
            yield StringValue(value=f"ok {request.value}")

    return _handlers(unary, server_stream, client_stream, bidi)


@dataclass
class Server:
    model: str
    port: int
    channel: grpc.aio.Channel
    seen: Seen


@pytest.fixture(params=[*AIO_MODELS, "sync"])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    """ "aio-installed": the layer wrapped at registration (`AioCallLayer.install`, as AioServiceApp serves)."""
    seen = Seen()
    concerns: list[CallConcern] = [seen]
    if request.param.startswith("aio"):
        aio = aio_server(request.param, concerns, OPTIONS)
        add_methods(aio, SERVICE, _aio_handlers(seen))
        port = aio.add_insecure_port("127.0.0.1:0")
        await aio.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Server("aio", port, channel, seen)
        await aio.stop(0)
    else:
        sync = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4), interceptors=[SyncCallLayer(concerns)], options=OPTIONS
        )
        add_methods(sync, SERVICE, _sync_handlers(seen))
        port = sync.add_insecure_port("127.0.0.1:0")
        sync.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Server("sync", port, channel, seen)
        await asyncio.to_thread(lambda: sync.stop(0).wait())


def _method(server: Server, name: str) -> Any:
    """A generic client of method `name`: it sends and receives raw bytes."""
    kind = {
        "Unary": "unary_unary",
        "ServerStream": "unary_stream",
        "ClientStream": "stream_unary",
        "Bidi": "stream_stream",
    }
    return getattr(server.channel, kind[name])(f"/{SERVICE}/{name}")


def _valid(value: str) -> bytes:
    return StringValue(value=value).SerializeToString()


def _violation(error: grpc.aio.AioRpcError) -> tuple[str, str]:
    """The one google.rpc.BadRequest field violation of an INVALID_ARGUMENT answer: (field, description)."""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{error.code().name}: {error.details()}"
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert len(status.details) == 1 and status.details[0].Unpack(bad_request)
    assert len(bad_request.field_violations) == 1
    violation = bad_request.field_violations[0]
    return violation.field, violation.description


async def _left(seen: Seen, calls: int) -> list[str]:
    """The codes the concerns left with, once `calls` calls ended: on grpc.aio the abort sends the status before the
    layer's `finally` runs `leave`, and the client shares this event loop (bounded wait)."""
    for _ in range(500):
        if len(seen.left) >= calls:
            break
        await asyncio.sleep(0.01)
    return seen.left


async def _fails(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async with asyncio.timeout(ANSWER_SECONDS):
            if isinstance(call, grpc.aio.UnaryStreamCall | grpc.aio.StreamStreamCall):
                async for _ in call:
                    pass
            else:
                await call
    return info.value


async def test_a_unary_request_that_is_no_protobuf_is_invalid_argument_before_the_servicer(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("Unary", "ServerStream"):
        error = await _fails(_method(server, name)(NOT_PROTOBUF))
        assert _violation(error) == ("request", f"is not a valid {REQUEST_TYPE} (protobuf wire format)")
    assert server.seen.requests == []
    assert server.seen.given == [None, None]  # the concerns entered (identity, spans) without a request
    assert await _left(server.seen, 2) == ["INVALID_ARGUMENT"] * 2
    # grpcio's own handling logged "Exception deserializing message" at ERROR with a traceback
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []

    # a valid request still reaches the servicer, and the concerns see it
    assert StringValue.FromString(await _method(server, "Unary")(_valid("a"))).value == "ok a"
    assert server.seen.requests == ["a"]
    assert server.seen.given[-1] == StringValue(value="a")


@pytest.mark.parametrize("name", ["ClientStream", "Bidi"])
async def test_a_streamed_request_that_is_no_protobuf_ends_the_stream_naming_its_place(
    server: Server, name: str
) -> None:
    # The bad message is the last one: a message sent after it can race the server's answer, and grpc's aio
    # client then fails its own send with INTERNAL ("Internal error from Core") before it reads the status.
    error = await _fails(_method(server, name)(iter([_valid("a"), _valid("b"), NOT_PROTOBUF])))
    assert _violation(error) == (
        "request",
        f"message 3 of the stream is not a valid {REQUEST_TYPE} (protobuf wire format)",
    )
    assert server.seen.requests == ["a", "b"]  # the servicer got the messages before it, never the bad one


def _grpc_message(body: bytes, declared: int | None = None) -> bytes:
    return struct.pack(">BI", 0, len(body) if declared is None else declared) + body


def _raw_call(port: int, path: str, data: bytes | None) -> str:
    """One call written with h2 over plaintext TCP: HEADERS, then `data` (if any) in one DATA frame that ends the
    stream. How it ended: "grpc-status N", "reset", "closed" or "no answer" within ANSWER_SECONDS."""
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_SECONDS) as sock:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", f"127.0.0.1:{port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(stream_id, headers, end_stream=data is None)
        if data is not None:
            conn.send_data(stream_id, data, end_stream=True)
        sock.sendall(conn.data_to_send())
        deadline = time.monotonic() + ANSWER_SECONDS
        while time.monotonic() < deadline:
            try:
                received = sock.recv(65536)
            except TimeoutError:
                break
            if not received:
                return "closed"
            for event in conn.receive_data(received):
                if isinstance(event, h2.events.StreamReset) and event.stream_id == stream_id:
                    return "reset"
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    found: dict[Any, Any] = dict(event.headers)  # str pairs: header_encoding is set
                    if "grpc-status" in found:
                        return f"grpc-status {found['grpc-status']}"
            sock.sendall(conn.data_to_send())
        return "no answer"


# What ends each way a unary call's stream can stop short, per model: the layer's INVALID_ARGUMENT on grpc.aio
# (grpc.aio alone left these open: "no answer"), grpcio's own UNIMPLEMENTED on the thread-pool server.
SHORT_BODIES = {
    "length prefix longer than the body": _grpc_message(_valid("a"), declared=len(_valid("a")) + 100),
    "length prefix cut short": b"\x00\x00",
    "no message at all": None,
}
SHORT_ANSWER = {"aio": "grpc-status 3", "sync": "grpc-status 12"}


@pytest.mark.parametrize("name", ["Unary", "ServerStream"])
@pytest.mark.parametrize("body", list(SHORT_BODIES))
async def test_a_unary_call_whose_stream_ends_without_a_whole_message_is_answered_at_once(
    server: Server, name: str, body: str
) -> None:
    started = time.monotonic()
    outcome = await asyncio.to_thread(_raw_call, server.port, f"/{SERVICE}/{name}", SHORT_BODIES[body])
    assert outcome == SHORT_ANSWER[server.model], f"{body}: {outcome}"
    assert time.monotonic() - started < ANSWER_SECONDS
    assert server.seen.requests == []
    if server.model == "aio":
        assert server.seen.given == [None]


async def test_the_raw_client_gets_answers_on_the_merits(server: Server) -> None:
    """The same raw client, well-formed: OK; and no protobuf in the body: INVALID_ARGUMENT (status 3)."""
    assert await asyncio.to_thread(_raw_call, server.port, f"/{SERVICE}/Unary", _grpc_message(_valid("a"))) == (
        "grpc-status 0"
    )
    assert await asyncio.to_thread(_raw_call, server.port, f"/{SERVICE}/Unary", _grpc_message(NOT_PROTOBUF)) == (
        "grpc-status 3"
    )
    assert server.seen.requests == ["a"]
