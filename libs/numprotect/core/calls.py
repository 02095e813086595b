"""The one per-method layer: what happens around every RPC but health and reflection, for both server models.

Every call of every service method passes through the call layer: the cross-cutting concerns (spans, then the
caller's identity) enter in order before the servicer runs and leave in reverse order after it, and any
exception the servicer or a concern raises becomes a precise status here (`status_for`), with google.rpc details
built by grpcio-status. A new per-method concern is one `CallConcern` added to `server.call_concerns`.

Health is never wrapped: its handlers are handed back untouched, so grpcio still sees the
`experimental_non_blocking` flag of `Health/Watch` and serves open watches without holding a worker thread of
the thread-pool server (wrapping it pinned one thread per watch stream). Kubernetes probes it without credentials.

On streams, a concern with a `check(state)` (identity: is the key still valid?) is asked again before every
message in either direction and, on grpc.aio, every `STREAM_CHECK_SECONDS` while the stream is idle; a check that
raises ends the call with its status.

Load shedding comes first, before spans and identity, so that refusing a call past the process's capacity costs
as little as possible: with an admission (`limits.AioAdmission`, `limits.PoolAdmission`) a call that gets no place
is answered RESOURCE_EXHAUSTED naming the limit, with google.rpc.RetryInfo, and never reaches the concerns or the
servicer. Unary-response calls hold a place until they end; a response stream is only refused when the process
is full (a place held for a stream's whole life would starve short calls; streams have their own limits).

On grpc.aio a concern's `leave` runs after the status is on its way when the call ends by an exception (the
abort sends it): a client in the same event loop may see the status before `leave` ran.

Framing: the layer installs its own request deserializer on every method. Bytes that are no message of the request
type become an `Undecodable` instead of grpcio's exception (UNKNOWN on grpc.aio, INTERNAL on the thread-pool
server); the layer answers INVALID_ARGUMENT naming the field "request" once the concerns entered, before the
servicer runs (on request streams, per message). On grpc.aio a method that takes one request is served as a
request stream whose first message the layer reads itself: grpc.aio never answers a unary call whose stream ends
without a complete message (no message, or a length prefix announcing more than came), and leaves it open until
the client goes away; the layer answers it INVALID_ARGUMENT. The thread-pool server answers such a call itself
(UNIMPLEMENTED, "requires exactly one request message"), before the layer runs.

`SyncCallLayer` and `AioCallLayer` are the two thin adapters (grpcio's thread-pool server, grpc.aio): they
differ only in calling, iterating and aborting synchronously or with await. The thread-pool server takes the layer
as its interceptor. On grpc.aio the bootstrap installs it at registration instead (`AioCallLayer.install`,
`LayeredServer`): each handler is wrapped once as the service registers it and grpc.aio finds it through one generic
handler, so a call pays no interceptor coroutines and grpc.aio's serving loop keeps one request pending instead of
one per method (it re-arms an `asyncio.wait` over all of them for every call). As an interceptor it still works.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from google.rpc import code_pb2, status_pb2
from grpc_status import rpc_status

from numprotect.core.errors import DomainError, InvalidArgument, Unimplemented, to_rpc_status
from numprotect.core.limits import AioAdmission, PoolAdmission
from numprotect.core.redis_client import storage_unavailable

log = logging.getLogger(__name__)

# Services whose handlers pass through untouched: polled constantly, no business meaning, no caller identity.
UNWRAPPED_SERVICES = ("grpc.health.v1.Health",)
STREAM_CHECK_SECONDS = 1.0

# A bug's status says no more than this: the traceback goes to the log, never to the caller.
_INTERNAL = status_pb2.Status(code=code_pb2.INTERNAL, message="internal error (logged)")


# A method's kind as gRPC's Prometheus interceptors name it, by (client streams, server streams).
GRPC_TYPES = {
    (False, False): "unary",
    (True, False): "client_stream",
    (False, True): "server_stream",
    (True, True): "bidi_stream",
}


@dataclass(frozen=True, slots=True)
class Method:
    """One RPC method: its path as gRPC names it, the two parts of the path, and its kind (`GRPC_TYPES`)."""

    path: str  # "/numprotect.translation.v1.TranslationService/Translate"
    service: str  # "numprotect.translation.v1.TranslationService"
    name: str  # "Translate"
    grpc_type: str = "unary"

    @classmethod
    def from_path(cls, path: str, grpc_type: str = "unary") -> Method:
        service, _, name = path.lstrip("/").partition("/")
        return cls(path, service, name, grpc_type)


class MethodConcern(Protocol):
    """A concern bound to one method: `enter` before the servicer (raise DomainError to refuse the call; `request`
    is the request message, None when the client streams them), `leave` after it with what `enter` returned (the
    context then carries the call's final status). It may also define `check(state)`, asked again on streams, and
    the message hooks `received()` and `sent()` (or None), run for each message of a request or response stream."""

    def enter(self, context: Any, request: Any = None) -> object: ...

    def leave(self, state: object, context: Any) -> None: ...


class CallConcern(Protocol):
    """A cross-cutting concern of every RPC; `for_method` runs once per method (resolve per-method data there)."""

    def for_method(self, method: Method) -> MethodConcern | None:
        """The concern for `method`, or None when it has nothing to do for it."""
        ...


def status_for(exc: BaseException, method: str) -> grpc.Status:
    """The status a servicer's exception ends its call with: the domain error's own, UNAVAILABLE with a retry hint
    for a transient storage condition (`redis_client.storage_unavailable`), UNIMPLEMENTED for an RPC the servicer
    lacks, INTERNAL (logged with the traceback) for a bug."""
    status: grpc.Status = rpc_status.to_status(rpc_status_of(exc, method))
    return status


def rpc_status_of(exc: BaseException, method: str) -> status_pb2.Status:
    """`status_for` as a google.rpc.Status message (a new one): what one item of a batch RPC answers instead of
    ending its call. A bug's traceback goes to the log."""
    error = domain_error(exc, method)
    if error is None:
        log.error("unexpected error", extra={"method": method}, exc_info=exc)
        return status_pb2.Status(code=_INTERNAL.code, message=_INTERNAL.message)
    return to_rpc_status(error)


def domain_error(exc: BaseException, method: str) -> DomainError | None:
    """The domain error an exception stands for, or None when it is a bug."""
    if isinstance(exc, DomainError):
        return exc
    unavailable = storage_unavailable(exc)
    if unavailable is not None:
        log.warning(
            "dependency unavailable", extra={"method": method, "error": repr(exc), "reason": unavailable.reason}
        )
        return unavailable
    if isinstance(exc, NotImplementedError):
        # Generated servicer bases raise this for RPCs a service does not implement.
        return Unimplemented(f"{method} is not implemented")
    return None


Behavior = Callable[..., Any]
Check = Callable[[object], None]
Deserializer = Callable[[bytes], Any]


@dataclass(frozen=True, slots=True)
class Undecodable:
    """What the layer's request deserializer hands on for bytes that are no message of the request type."""

    request_type: str  # "numprotect.allocation.v1.GetNumberRequest"
    error: Exception

    def refusal(self, index: int | None = None) -> InvalidArgument:
        """INVALID_ARGUMENT naming the request; `index`: the message's place in a request stream (from 1)."""
        which = "" if index is None else f"message {index} of the stream "
        return InvalidArgument.field("request", f"{which}is not a valid {self.request_type} (protobuf wire format)")


def no_request() -> InvalidArgument:
    """A unary call on grpc.aio whose stream ended without a complete message (see the module's "Framing")."""
    return InvalidArgument.field(
        "request",
        "is missing: a call of this method carries exactly one complete request message (the stream ended without "
        "one, or before the length its prefix announced)",
    )


def _given(request: Any, streamed: bool) -> Any:
    """The request the concerns see: None on a request stream and when there is no valid request message."""
    return None if streamed or request is None or type(request) is Undecodable else request


def _refusal(request: Undecodable | None) -> InvalidArgument:
    """Why a call without a valid request (`_given` None, not streamed) is refused."""
    return no_request() if request is None else request.refusal()


def tolerant_deserializer(deserializer: Deserializer | None, fallback_name: str) -> Deserializer | None:
    """`deserializer` returning an `Undecodable` instead of raising (on success a try costs nothing: the hot path's
    cost is one more Python call); None (bytes handed on as they are) stays None."""
    if deserializer is None:
        return None
    message_type = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    request_type = str(getattr(message_type, "full_name", fallback_name))

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # DecodeError, or whatever a custom deserializer raises
            return Undecodable(request_type, exc)

    return deserialize


def _checks(concerns: tuple[MethodConcern, ...], states: list[object]) -> list[Callable[[], None]]:
    """The stream checks of the concerns that entered, bound to their states."""
    bound: list[Callable[[], None]] = []
    for concern, state in zip(concerns, states, strict=False):
        check: Check | None = getattr(concern, "check", None)
        if check is not None:
            bound.append(functools.partial(check, state))
    return bound


def _hooks(concerns: tuple[MethodConcern, ...], name: str) -> list[Callable[[], None]]:
    """The concerns' message hooks `name` ("received", "sent"): run for each message of a stream, in that direction
    (unlike checks, never while a stream is idle)."""
    return [hook for hook in (getattr(concern, name, None) for concern in concerns) if hook is not None]


def _run_checks(checks: list[Callable[[], None]]) -> None:
    for check in checks:
        check()


class _CallLayer:
    """What both adapters share: the skip list, binding the concerns per method, and the wrapped-handler cache."""

    # Whether a method that takes one request is served as a request stream (grpc.aio: see "Framing").
    READS_ONE_REQUEST = False

    def __init__(self, concerns: Sequence[CallConcern]) -> None:
        self._concerns = list(concerns)
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    def _handler(self, handler: Any, path: str) -> Any:
        if handler is None or path.startswith(UNWRAPPED_SERVICES, 1):
            return handler
        cached = self._wrapped.get(path)
        if cached is not None and cached[0] is handler:
            return cached[1]
        method = Method.from_path(path, GRPC_TYPES[(handler.request_streaming, handler.response_streaming)])
        bound = [c for c in (concern.for_method(method) for concern in self._concerns) if c is not None]
        wrapped = self._rewrap(handler, method, tuple(bound))
        self._wrapped[path] = (handler, wrapped)
        return wrapped

    def _rewrap(self, handler: Any, method: Method, concerns: tuple[MethodConcern, ...]) -> grpc.RpcMethodHandler:
        serializers: dict[str, Any] = {
            "request_deserializer": tolerant_deserializer(handler.request_deserializer, f"{method.name} request"),
            "response_serializer": handler.response_serializer,
        }
        behavior = handler.unary_unary or handler.stream_unary or handler.unary_stream or handler.stream_stream
        if getattr(behavior, "experimental_non_blocking", False):
            # It answers through a callback grpcio passes in: a wrapper would break it and skip the concerns.
            raise TypeError(f"{method.path}: a non-blocking handler cannot pass through the call layer")
        as_stream = self.READS_ONE_REQUEST
        if handler.unary_unary is not None:
            unary_kind = grpc.stream_unary_rpc_method_handler if as_stream else grpc.unary_unary_rpc_method_handler
            return unary_kind(self._unary(handler.unary_unary, method, concerns, False), **serializers)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, method, concerns, True), **serializers
            )
        if handler.unary_stream is not None:
            stream_kind = grpc.stream_stream_rpc_method_handler if as_stream else grpc.unary_stream_rpc_method_handler
            return stream_kind(self._stream(handler.unary_stream, method, concerns, False), **serializers)
        return grpc.stream_stream_rpc_method_handler(
            self._stream(handler.stream_stream, method, concerns, True), **serializers
        )

    def _unary(
        self, behavior: Behavior, method: Method, concerns: tuple[MethodConcern, ...], streamed: bool
    ) -> Behavior:
        """`streamed`: the client streams its requests (the concerns see None and check each one)."""
        raise NotImplementedError

    def _stream(
        self, behavior: Behavior, method: Method, concerns: tuple[MethodConcern, ...], streamed: bool
    ) -> Behavior:
        raise NotImplementedError


def _leave(concerns: tuple[MethodConcern, ...], states: list[object], context: Any) -> None:
    for index in range(len(states) - 1, -1, -1):
        concerns[index].leave(states[index], context)


def _ended_by_client(context: Any) -> None:
    """Sets the status of a call that ended without an answer, because its client cancelled it or its deadline
    passed, before the concerns leave: the metrics and the audit trail must not record such a call as OK (its result,
    if any, never reached the client). DEADLINE_EXCEEDED when no time was left, else CANCELLED."""
    remaining = context.time_remaining()
    expired = remaining is not None and remaining <= 0
    context.set_code(grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED)


class SyncCallLayer(_CallLayer, grpc.ServerInterceptor):
    """The call layer on grpcio's thread-pool server; with an admission, it sheds load (`limits.PoolAdmission`)."""

    def __init__(self, concerns: Sequence[CallConcern], admission: PoolAdmission | None = None) -> None:
        super().__init__(concerns)
        self._admission = admission
        self._refusals: dict[str, grpc.RpcMethodHandler] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        # grpcio runs this on its polling thread as the call arrives: the moment to refuse it, before it queues.
        path = handler_call_details.method
        handler: grpc.RpcMethodHandler | None = self._handler(continuation(handler_call_details), path)
        if self._admission is not None and handler is not None and self._admission.queue_full():
            refusal = self._refusals.get(path)
            if refusal is None and not path.startswith(UNWRAPPED_SERVICES, 1):
                refusal = self._refusals[path] = self._refusal(handler, self._admission)
            return refusal or handler
        return handler

    @staticmethod
    def _refusal(handler: Any, admission: PoolAdmission) -> grpc.RpcMethodHandler:
        """A handler of the same kind that answers RESOURCE_EXHAUSTED on the admission's own small pool (not behind
        the queue it refuses to join)."""

        def refuse(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort_with_status(admission.shedding.refuse("queue_full"))

        refuse.experimental_thread_pool = admission.refusals  # type: ignore[attr-defined]
        kinds = {
            "unary_unary": grpc.unary_unary_rpc_method_handler,
            "unary_stream": grpc.unary_stream_rpc_method_handler,
            "stream_unary": grpc.stream_unary_rpc_method_handler,
            "stream_stream": grpc.stream_stream_rpc_method_handler,
        }
        kind = next(name for name in kinds if getattr(handler, name) is not None)
        made: grpc.RpcMethodHandler = kinds[kind](
            refuse,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        return made

    def _late(self, context: grpc.ServicerContext) -> None:
        """On the worker that starts a call: refuses it (raises) when it waited too long or its deadline passed."""
        admission = self._admission
        if admission is not None and admission.late(context):
            context.abort_with_status(admission.shedding.refuse("queue_wait"))

    def _unary(
        self, behavior: Behavior, method: Method, concerns: tuple[MethodConcern, ...], streamed: bool
    ) -> Behavior:
        path = method.path
        late = self._late
        if not concerns:

            def bare(request: Any, context: grpc.ServicerContext) -> Any:
                late(context)
                try:
                    if streamed:
                        request = _checked_requests(request, [])
                    elif type(request) is Undecodable:
                        raise request.refusal()
                    return behavior(request, context)
                except Exception as exc:
                    _sync_abort(context, exc, path)

            return bare

        received = _hooks(concerns, "received")

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            late(context)
            states: list[object] = []
            try:
                given = _given(request, streamed)
                for concern in concerns:
                    states.append(concern.enter(context, given))
                if streamed:
                    request = _checked_requests(request, [*_checks(concerns, states), *received])
                elif given is None:
                    raise _refusal(request)
                return behavior(request, context)
            except Exception as exc:
                _sync_abort(context, exc, path)
            finally:
                # A thread-pool servicer runs to its end even when its client is gone: told apart here (one lock
                # acquisition, for each call that set no code, the successful ones included).
                if context.code() is None and not context.is_active():  # type: ignore[attr-defined]
                    _ended_by_client(context)
                _leave(concerns, states, context)

        return unary

    def _stream(
        self, behavior: Behavior, method: Method, concerns: tuple[MethodConcern, ...], streamed: bool
    ) -> Behavior:
        path = method.path
        late = self._late
        received = _hooks(concerns, "received")
        sent = _hooks(concerns, "sent")

        # grpcio iterates a call's responses on the one worker thread that runs the call, so what a concern makes
        # current in `enter` stays current, on that thread, until `leave`.
        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            late(context)
            states: list[object] = []
            try:
                given = _given(request, streamed)
                for concern in concerns:
                    states.append(concern.enter(context, given))
                checks = _checks(concerns, states)
                if streamed:
                    request = _checked_requests(request, [*checks, *received])
                elif given is None:
                    raise _refusal(request)
                before_each = [*checks, *sent]
                if not before_each:
                    yield from behavior(request, context)
                    return
                for response in behavior(request, context):
                    _run_checks(before_each)
                    yield response
            except Exception as exc:
                _sync_abort(context, exc, path)
            finally:
                # A thread-pool servicer runs to its end even when its client is gone: told apart here (one lock
                # acquisition, for each call that set no code, the successful ones included).
                if context.code() is None and not context.is_active():  # type: ignore[attr-defined]
                    _ended_by_client(context)
                _leave(concerns, states, context)

        return stream


class AioCallLayer(_CallLayer, grpc.aio.ServerInterceptor):
    """The call layer on grpc.aio (each call runs in its own task, so context made current stays with it); with an
    admission, it sheds load (`limits.AioAdmission`)."""

    READS_ONE_REQUEST = True

    def __init__(self, concerns: Sequence[CallConcern], admission: AioAdmission | None = None) -> None:
        super().__init__(concerns)
        self._admission = admission

    def install(self, server: grpc.aio.Server) -> LayeredServer:
        """`server` with the layer put in place at registration instead of per call: register the services on what
        this returns (see `LayeredServer`); `server` itself must have no `AioCallLayer` interceptor."""
        return LayeredServer(server, self)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler: grpc.RpcMethodHandler = self._handler(
            await continuation(handler_call_details), handler_call_details.method
        )
        return handler

    def _unary(
        self, behavior: Behavior, method: Method, concerns: tuple[MethodConcern, ...], streamed: bool
    ) -> Behavior:
        path = method.path
        admission = self._admission
        received = _hooks(concerns, "received")

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if not streamed:  # the one request, read before a place is taken (a slow sender holds none)
                request = await _read_one(context)
            if admission is not None and not admission.try_enter():
                refusal = await admission.wait(context.time_remaining())
                if refusal is not None:
                    await _abort(context, refusal)
            states: list[object] = []
            given: Any = None
            refused: grpc.Status | None = None
            try:
                given = _given(request, streamed)
                for concern in concerns:
                    states.append(concern.enter(context, given))
                if streamed:
                    request = _checked_async_requests(request, [*_checks(concerns, states), *received])
                elif given is None:
                    raise _refusal(request)
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise  # the servicer ended the call itself, with its own status
            except asyncio.CancelledError:
                _ended_by_client(context)  # grpc.aio cancels the servicer's task when the client goes or time is up
                raise
            except Exception as exc:
                refused = _refused(context, exc, path)
            finally:
                _leave(concerns, states, context)
                if admission is not None:
                    admission.leave()
            # Aborted outside the except block and with the request dropped: grpc.aio keeps the AbortError on the
            # call, and its traceback (or the servicer's exception as its context) would keep the request alive in a
            # cycle until a full garbage collection (4-MiB requests grew a process by GBs).
            assert refused is not None  # reached from the except block only
            request = given = None
            states.clear()
            await _abort(context, refused)

        return unary

    def _stream(
        self, behavior: Behavior, method: Method, concerns: tuple[MethodConcern, ...], streamed: bool
    ) -> Behavior:
        path = method.path
        admission = self._admission
        received = _hooks(concerns, "received")
        sent = _hooks(concerns, "sent")

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            if not streamed:
                request = await _read_one(context)
            if admission is not None and not admission.has_room():
                await _abort(context, admission.shedding.refuse("queue_full"))
            states: list[object] = []
            given: Any = None
            refused: grpc.Status | None = None
            try:
                given = _given(request, streamed)
                for concern in concerns:
                    states.append(concern.enter(context, given))
                checks = _checks(concerns, states)
                if streamed:
                    request = _checked_async_requests(request, [*checks, *received])
                elif given is None:
                    raise _refusal(request)
                responses = _paced(behavior(request, context), checks) if checks else behavior(request, context)
                if not sent:
                    async for response in responses:
                        yield response
                    return
                async for response in responses:
                    _run_checks(sent)
                    yield response
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError:
                _ended_by_client(context)
                raise
            except Exception as exc:
                refused = _refused(context, exc, path)
            finally:
                _leave(concerns, states, context)
            if refused is not None:  # as in unary: aborted with the request dropped
                request = given = None
                states.clear()
                await _abort(context, refused)

        return stream


class _HandlerTable(grpc.GenericRpcHandler):
    """The handlers of a `LayeredServer`, each wrapped by the layer once, looked up by path: the one handler grpc.aio
    asks for every call (handlers added as generic handlers only are wrapped on first use, `_CallLayer._handler`)."""

    def __init__(self, layer: AioCallLayer) -> None:
        self._layer = layer
        self._methods: dict[str, grpc.RpcMethodHandler] = {}
        self._generic: list[grpc.GenericRpcHandler] = []

    def add(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        for name, handler in handlers.items():
            path = f"/{service}/{name}"
            self._methods[path] = self._layer._handler(handler, path)

    def extend(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        path = handler_call_details.method
        handler = self._methods.get(path)
        if handler is not None:
            return handler
        for generic in self._generic:
            found = generic.service(handler_call_details)
            if found is not None:
                wrapped: grpc.RpcMethodHandler = self._layer._handler(found, path)
                return wrapped
        return None


class LayeredServer(grpc.aio.Server):
    """A grpc.aio server whose services pass through an `AioCallLayer` wrapped at registration: what the generated
    `add_..._to_server(servicer, server)`, health and reflection register on; the rest is the server's.

    The layer as an interceptor costs every call (health too) an `intercept_service` coroutine and grpc.aio's
    continuation chain; and each method registered with `add_registered_method_handlers` keeps one more request
    pending in grpc.aio's serving loop, which re-arms an `asyncio.wait` over all of them for every call that
    arrives (~0.6 us per pending request: binding has 11, allocation ~27). Here the services' handlers are wrapped
    once and served by one generic handler (one pending request), a dict lookup per call.
    """

    def __init__(self, server: grpc.aio.Server, layer: AioCallLayer) -> None:
        self.server = server
        self._table = _HandlerTable(layer)
        server.add_generic_rpc_handlers((self._table,))

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict[str, Any]) -> None:
        self._table.add(service_name, method_handlers)

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._table.extend(generic_rpc_handlers)

    def add_insecure_port(self, address: str) -> int:
        return self.server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self.server.add_secure_port(address, server_credentials)

    async def start(self) -> None:
        await self.server.start()

    async def stop(self, grace: float | None = None) -> None:
        await self.server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109 (grpc's signature)
        return await self.server.wait_for_termination(timeout)


def _checked_requests(requests: Iterator[Any], checks: list[Callable[[], None]]) -> Iterator[Any]:
    """The requests of a stream, each after the checks; one that is no valid message ends the call."""
    for index, request in enumerate(requests, 1):
        _run_checks(checks)
        if type(request) is Undecodable:
            raise request.refusal(index)
        yield request


async def _checked_async_requests(requests: AsyncIterator[Any], checks: list[Callable[[], None]]) -> AsyncIterator[Any]:
    index = 0
    async for request in requests:
        index += 1
        _run_checks(checks)
        if type(request) is Undecodable:
            raise request.refusal(index)
        yield request


async def _paced(responses: AsyncIterator[Any], checks: list[Callable[[], None]]) -> AsyncIterator[Any]:
    """The responses, with the checks run before each and every STREAM_CHECK_SECONDS while none comes."""
    pending: asyncio.Future[Any] = asyncio.ensure_future(anext(responses))
    try:
        while True:
            done, _ = await asyncio.wait((pending,), timeout=STREAM_CHECK_SECONDS)
            _run_checks(checks)
            if not done:
                continue
            try:
                response = pending.result()
            except StopAsyncIteration:
                return
            yield response
            pending = asyncio.ensure_future(anext(responses))
    finally:
        # Cancelled again if it goes on: a cancellation the servicer's generator swallows (gh-86296, inside
        # redis-py's wait_for) would leave it running to its next yield and then suspended there for good, its own
        # cleanup (a WatchCdrs slot) undone. Bounded, so a generator that ignores every cancellation cannot hold
        # the call.
        for _ in range(3):
            if pending.done():
                break
            pending.cancel()
            await asyncio.wait((pending,), timeout=1.0)
        if pending.done():
            if not pending.cancelled():
                pending.exception()  # retrieved: a check that failed first leaves it unread otherwise
            # A generator left at a yield (a check failed with a response in hand) is closed now, so its own
            # cleanup (a WatchCdrs slot) runs at once, not whenever it is garbage-collected. Bounded as above.
            aclose = getattr(responses, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0):
                        await aclose()


def _sync_abort(context: grpc.ServicerContext, exc: Exception, path: str) -> None:
    """Ends a thread-pool call with the exception's status (raises), unless the servicer already aborted it:
    grpcio's `abort` raises a bare Exception after setting the code, which must stand."""
    code = context.code()  # type: ignore[attr-defined]
    if code is not None and code != grpc.StatusCode.OK and type(exc) is Exception:
        raise exc
    context.abort_with_status(status_for(exc, path))


async def _read_one(context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    """A call's one request (None when the stream ended without one), read through the context: a reader
    generator (`anext(request_iterator)`) stays suspended holding the request in a cycle with its reader."""
    request = await context.read()
    return None if request is grpc.aio.EOF else request  # type: ignore[attr-defined]


def _refused(context: grpc.aio.ServicerContext[Any, Any], exc: Exception, path: str) -> grpc.Status:
    """The status `exc` ends the call with, set on the context now so the concerns' leave sees it."""
    status = status_for(exc, path)
    context.set_code(status.code)
    context.set_details(status.details)
    return status


async def _abort(context: grpc.aio.ServicerContext[Any, Any], status: grpc.Status) -> None:
    await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)
