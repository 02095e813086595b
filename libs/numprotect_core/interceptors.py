"""The interceptor that turns domain errors (and Redis outages) into gRPC status codes, in one place."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from numprotect_core.errors import DomainError, Unavailable, Unimplemented, to_rpc_status

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
    serializers: dict[str, Any] = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        unary_unary = handler.unary_unary

        async def unary_unary_wrapper(request: Any, context: Any) -> Any:
            try:
                return await unary_unary(request, context)
            except Exception as exc:
                await _fail(context, exc, method)

        return grpc.unary_unary_rpc_method_handler(unary_unary_wrapper, **serializers)
    if handler.unary_stream is not None:
        unary_stream = handler.unary_stream

        async def unary_stream_wrapper(request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for item in unary_stream(request, context):
                    yield item
            except Exception as exc:
                await _fail(context, exc, method)

        return grpc.unary_stream_rpc_method_handler(unary_stream_wrapper, **serializers)
    if handler.stream_unary is not None:
        stream_unary = handler.stream_unary

        async def stream_unary_wrapper(request_iterator: Any, context: Any) -> Any:
            try:
                return await stream_unary(request_iterator, context)
            except Exception as exc:
                await _fail(context, exc, method)

        return grpc.stream_unary_rpc_method_handler(stream_unary_wrapper, **serializers)
    stream_stream = handler.stream_stream

    async def stream_stream_wrapper(request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        try:
            async for item in stream_stream(request_iterator, context):
                yield item
        except Exception as exc:
            await _fail(context, exc, method)

    return grpc.stream_stream_rpc_method_handler(stream_stream_wrapper, **serializers)
