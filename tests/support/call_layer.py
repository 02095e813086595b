"""Servers with the call layer for tests of the layer itself (numprotect.core.calls), in each way it is used."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from numprotect.core.calls import AioCallLayer, CallConcern

# The aio ways: "aio" takes the layer as a grpc.aio interceptor; "aio-installed" wraps the handlers as they are
# registered (`AioCallLayer.install`, what AioServiceApp serves with).
AIO_MODELS = ("aio", "aio-installed")


def aio_server(model: str, concerns: Sequence[CallConcern], options: list[tuple[str, Any]]) -> grpc.aio.Server:
    """A grpc.aio server with the layer over `concerns`, the `model` way (one of AIO_MODELS)."""
    if model == "aio":
        return grpc.aio.server(interceptors=[AioCallLayer(concerns)], options=options)
    assert model == "aio-installed", model
    return AioCallLayer(concerns).install(grpc.aio.server(options=options))


def add_methods(server: Any, service: str, methods: dict[str, grpc.RpcMethodHandler]) -> None:
    """As generated `add_..._to_server` functions do: a generic handler and the same methods registered."""
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, methods),))
    server.add_registered_method_handlers(service, methods)
