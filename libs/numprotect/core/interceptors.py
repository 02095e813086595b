"""The interceptor that turns domain errors (and Redis outages) into gRPC status codes, in one place."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from numprotect.core.errors import DomainError, Unavailable, Unimplemented, to_rpc_status

log = logging.getLogger(__name__)

_STATUS_DETAILS_KEY = "grpc-status-details-bin"
_DEPENDENCY_DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError)


async def abort_with_error(context: grpc.aio.ServicerContext[Any, Any], error: DomainError) -> None:
    """Ends the call with the error's code, message and google.rpc details (never returns)."""
    status = to_rpc_status(error)
    await context.abort(
        error.code, error.message, trailing_metadata=((_STATUS_DETAILS_KEY, status.SerializeToString()),)
    )


def as_domain_error(exc: BaseException, method: str) -> DomainError | None:
    """The domain error an exception stands for, or None when it is a bug."""
    if isinstance(exc, DomainError):
        return exc
    if isinstance(exc, _DEPENDENCY_DOWN):
        log.warning("dependency unavailable", extra={"method": method, "error": repr(exc)})
        return Unavailable("storage unavailable, retry later")
    if isinstance(exc, NotImplementedError):
        # Generated servicer bases raise this for RPCs a service does not implement.
        return Unimplemented(f"{method} is not implemented")
    return None


async def _fail(context: grpc.aio.ServicerContext[Any, Any], exc: Exception, method: str) -> None:
    error = as_domain_error(exc, method)
    if error is None:
        log.exception("unexpected error", extra={"method": method})
        await context.abort(grpc.StatusCode.INTERNAL, "internal error (logged)")
        return
    await abort_with_error(context, error)


Behavior = Callable[[Any, Any], Any]


def rewrap(
    handler: Any, wrap_unary: Callable[[Behavior], Behavior], wrap_stream: Callable[[Behavior], Behavior]
) -> grpc.RpcMethodHandler:
    """A handler of the same kind and serializers whose behaviour is wrapped.

    `wrap_unary` wraps a behaviour that returns one response (unary-unary, stream-unary), `wrap_stream` one that
    yields responses (unary-stream, stream-stream); the request side, one message or an iterator, is passed on.
    """
    serializers: dict[str, Any] = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary), **serializers)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(wrap_unary(handler.stream_unary), **serializers)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream), **serializers)
    return grpc.stream_stream_rpc_method_handler(wrap_stream(handler.stream_stream), **serializers)


class WrappedHandlers:
    """Wrapped method handlers per method: interceptors wrap a handler once, not on every call."""

    def __init__(self, wrap: Callable[[Any, str], Any]) -> None:
        self._wrap = wrap
        self._by_method: dict[str, tuple[Any, Any]] = {}

    def get(self, handler: Any, method: str) -> Any:
        """`wrap(handler, method)`, made on first use (and again if the method's handler changed)."""
        if handler is None:
            return None
        cached = self._by_method.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method)
        self._by_method[method] = (handler, wrapped)
        return wrapped


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler so that DomainError subclasses end the call with their status and details."""

    def __init__(self) -> None:
        self._wrapped = WrappedHandlers(_wrap)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        wrapped: grpc.RpcMethodHandler = self._wrapped.get(
            await continuation(handler_call_details), handler_call_details.method
        )
        return wrapped


def _wrap(handler: Any, method: str) -> grpc.RpcMethodHandler:
    def wrap_unary(behavior: Behavior) -> Behavior:
        async def unary(request: Any, context: Any) -> Any:
            try:
                return await behavior(request, context)
            except Exception as exc:
                await _fail(context, exc, method)

        return unary

    def wrap_stream(behavior: Behavior) -> Behavior:
        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for item in behavior(request, context):
                    yield item
            except Exception as exc:
                await _fail(context, exc, method)

        return stream

    return rewrap(handler, wrap_unary, wrap_stream)
