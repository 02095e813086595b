"""What tests read from a failed call: its status, its google.rpc details."""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


async def rpc_error(awaitable: Any) -> grpc.aio.AioRpcError:
    """Awaits a call that must fail and returns its error."""
    try:
        await awaitable
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the call succeeded")


async def fails(code: grpc.StatusCode, awaitable: Any) -> grpc.aio.AioRpcError:
    """Awaits a call, asserts it fails with `code`, returns the error."""
    error = await rpc_error(awaitable)
    assert error.code() == code, f"{error.code().name}: {error.details()}"
    return error


async def outcome(awaitable: Any) -> tuple[grpc.StatusCode, str]:
    """The status code and message a unary call ends with (OK and "" when it succeeds)."""
    try:
        await awaitable
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def code_of(awaitable: Any) -> grpc.StatusCode:
    """The status code a unary call ends with (OK when it succeeds)."""
    return (await outcome(awaitable))[0]


def violated_fields(error: grpc.aio.AioRpcError) -> list[str]:
    """Field names of the google.rpc.BadRequest detail of an INVALID_ARGUMENT answer."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    return status_fields(status)


def status_fields(status: status_pb2.Status) -> list[str]:
    """Field names of a google.rpc.Status's BadRequest detail (e.g. a batch item's error)."""
    fields: list[str] = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields.extend(v.field for v in bad.field_violations)
    return fields
