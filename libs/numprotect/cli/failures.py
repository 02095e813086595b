"""What a failed command prints (one line on stderr) and the exit status it ends with.

Exit status: 0 success; 1 to 16 the gRPC status code number of a failed call (5 NOT_FOUND, 3 INVALID_ARGUMENT,
7 PERMISSION_DENIED, 14 UNAVAILABLE, 4 DEADLINE_EXCEEDED, ...); 20 a check that found a problem (a broken audit
chain, doctor's violations); 64 a usage error (unknown option, bad value); 78 a configuration problem (no such
context, unreadable CA or token file, a malformed config file); 130 interrupted (Ctrl-C outside `cdrs watch`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

PROG = "numprotect"
EXIT_OK = 0
EXIT_CHECK_FAILED = 20
EXIT_USAGE = 64
EXIT_CONFIG = 78
EXIT_INTERRUPTED = 130
# Anything else that went wrong on this side (a bug): still one line, never a traceback.
EXIT_SOFTWARE = 70


class CliError(Exception):
    """A failure found on this side; str() is the line shown, `exit_code` the status the command ends with."""

    def __init__(self, message: str, exit_code: int = EXIT_CONFIG) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def exit_code_of(error: grpc.RpcError) -> int:
    code = _code(error)
    return int(code.value[0]) if code is not None else int(grpc.StatusCode.UNKNOWN.value[0])


def _code(error: grpc.RpcError) -> grpc.StatusCode | None:
    code = getattr(error, "code", None)
    return code() if callable(code) else None


def describe_rpc_error(error: grpc.RpcError) -> str:
    """`CODE: message (Detail ...; Detail ...)` on one line: the status and its google.rpc details."""
    code = _code(error)
    name = code.name if code is not None else "UNKNOWN"
    details_of = getattr(error, "details", None)
    message = (details_of() if callable(details_of) else None) or ""
    line = f"{name}: {message}" if message else name
    described = [_describe(detail) for detail in _details(error)]
    if described:
        line += f" ({'; '.join(described)})"
    return " ".join(line.split())  # one line whatever the server put in it


def _details(error: grpc.RpcError) -> list[any_pb2.Any]:
    if not isinstance(error, grpc.Call):
        return []
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # a status whose code or message disagree with the trailer's: show the trailer's code only
        return []
    return list(status.details) if status is not None else []


def _describe(detail: any_pb2.Any) -> str:
    for kind, describe in _DESCRIBERS:
        if detail.Is(kind.DESCRIPTOR):
            message = kind()
            detail.Unpack(message)
            return str(describe(message))
    return detail.type_url.rsplit("/", 1)[-1]


def _bad_request(detail: error_details_pb2.BadRequest) -> str:
    return "BadRequest " + ", ".join(f"{v.field}: {v.description}" for v in detail.field_violations)


def _error_info(detail: error_details_pb2.ErrorInfo) -> str:
    text = f"ErrorInfo reason={detail.reason}"
    if detail.domain:
        text += f" domain={detail.domain}"
    return text + "".join(f" {key}={value}" for key, value in sorted(detail.metadata.items()))


def _retry_info(detail: error_details_pb2.RetryInfo) -> str:
    delay = detail.retry_delay.seconds + detail.retry_delay.nanos / 1e9
    return f"RetryInfo retry after {delay:g}s"


def _quota_failure(detail: error_details_pb2.QuotaFailure) -> str:
    return "QuotaFailure " + ", ".join(f"{v.subject}: {v.description}" for v in detail.violations)


def _precondition_failure(detail: error_details_pb2.PreconditionFailure) -> str:
    return "PreconditionFailure " + ", ".join(f"{v.type} {v.subject}: {v.description}" for v in detail.violations)


def _resource_info(detail: error_details_pb2.ResourceInfo) -> str:
    text = f"ResourceInfo {detail.resource_type} {detail.resource_name}"
    return f"{text}: {detail.description}" if detail.description else text


def _help(detail: error_details_pb2.Help) -> str:
    return "Help " + ", ".join(f"{link.description} {link.url}".strip() for link in detail.links)


def _localized(detail: error_details_pb2.LocalizedMessage) -> str:
    return f"LocalizedMessage {detail.locale}: {detail.message}"


def _debug_info(detail: error_details_pb2.DebugInfo) -> str:
    return f"DebugInfo {detail.detail}"


_DESCRIBERS: tuple[tuple[Any, Callable[[Any], str]], ...] = (
    (error_details_pb2.BadRequest, _bad_request),
    (error_details_pb2.ErrorInfo, _error_info),
    (error_details_pb2.RetryInfo, _retry_info),
    (error_details_pb2.QuotaFailure, _quota_failure),
    (error_details_pb2.PreconditionFailure, _precondition_failure),
    (error_details_pb2.ResourceInfo, _resource_info),
    (error_details_pb2.Help, _help),
    (error_details_pb2.LocalizedMessage, _localized),
    (error_details_pb2.DebugInfo, _debug_info),
)
