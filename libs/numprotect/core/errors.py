"""Domain errors and the one place that maps them to gRPC status codes with google.rpc details."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class DomainError(Exception):
    """Base of every error a servicer raises on purpose; never becomes INTERNAL."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def details(self) -> list[any_pb2.Any]:
        return []


class InvalidArgument(DomainError):
    """Bad input. Carries one violation per offending field (google.rpc.BadRequest)."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: Sequence[FieldViolation] | FieldViolation) -> None:
        self.violations = [violations] if isinstance(violations, FieldViolation) else list(violations)
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in self.violations))

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        return cls(FieldViolation(field, description))

    def details(self) -> list[any_pb2.Any]:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in self.violations
            ]
        )
        return [_pack(bad_request)]


class FieldRule(Protocol):
    """A rule of one field's value (numprotect.core.identifiers.IdentifierRule)."""

    def violation(self, field: str, raw: str) -> FieldViolation | None: ...


class Violations:
    """Collects field violations; raise_if_any raises one InvalidArgument naming all of them."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def identifier(self, rule: FieldRule, field: str, raw: str) -> str:
        """`raw`, noting a violation when it is empty or breaks the rule (numprotect.core.identifiers)."""
        problem = rule.violation(field, raw)
        if problem is not None:
            self.items.append(problem)
        return raw

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)


class FailedPrecondition(DomainError):
    """The system is not in a state that allows the call (google.rpc.PreconditionFailure)."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, message: str, *, type_: str = "STATE", subject: str = "") -> None:
        super().__init__(message)
        self.type_ = type_
        self.subject = subject

    def details(self) -> list[any_pb2.Any]:
        failure = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type=self.type_, subject=self.subject, description=self.message
                )
            ]
        )
        return [_pack(failure)]


class _ResourceError(DomainError):
    def __init__(self, message: str, *, resource_type: str = "", resource_name: str = "") -> None:
        super().__init__(message)
        self.resource_type = resource_type
        self.resource_name = resource_name

    def details(self) -> list[any_pb2.Any]:
        if not self.resource_type:
            return []
        info = error_details_pb2.ResourceInfo(
            resource_type=self.resource_type, resource_name=self.resource_name, description=self.message
        )
        return [_pack(info)]


class NotFound(_ResourceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(_ResourceError):
    code = grpc.StatusCode.ALREADY_EXISTS


# What an UNAVAILABLE answer suggests the caller waits before retrying, unless the cause knows better.
DEFAULT_RETRY_AFTER_SECONDS = 1.0


def retry_info(seconds: float) -> any_pb2.Any:
    """google.rpc.RetryInfo: how long the caller should wait before retrying."""
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(round(seconds * 1e9))
    return _pack(error_details_pb2.RetryInfo(retry_delay=delay))


class ResourceExhausted(DomainError):
    """A pool or quota ran out (google.rpc.QuotaFailure; google.rpc.RetryInfo too when a retry later may pass)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, subject: str = "", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.subject = subject
        self.retry_after = retry_after

    def details(self) -> list[any_pb2.Any]:
        failure = error_details_pb2.QuotaFailure(
            violations=[error_details_pb2.QuotaFailure.Violation(subject=self.subject, description=self.message)]
        )
        if self.retry_after is None:
            return [_pack(failure)]
        return [_pack(failure), retry_info(self.retry_after)]


class Aborted(DomainError):
    """A concurrent change won; the caller may retry."""

    code = grpc.StatusCode.ABORTED


class Unavailable(DomainError):
    """A dependency (Redis, another service) cannot answer now, or the server sheds load; retryable.

    Carries google.rpc.RetryInfo (when to retry) and, with a `reason`, google.rpc.ErrorInfo naming the cause
    (e.g. REDIS_LOADING) so that a client or an operator can tell an outage from overload.
    """

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, *, retry_after: float = DEFAULT_RETRY_AFTER_SECONDS, reason: str = "") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.reason = reason

    def details(self) -> list[any_pb2.Any]:
        details = [retry_info(self.retry_after)]
        if self.reason:
            details.append(_pack(error_details_pb2.ErrorInfo(reason=self.reason, domain="numprotect")))
        return details


class Unauthenticated(DomainError):
    """No valid credentials. One message for every cause: the caller learns nothing about which keys exist."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(DomainError):
    """An authenticated caller whose role or scope does not allow the call (google.rpc.ErrorInfo names why)."""

    code = grpc.StatusCode.PERMISSION_DENIED

    def __init__(self, message: str, *, reason: str = "PERMISSION_DENIED") -> None:
        super().__init__(message)
        self.reason = reason

    def details(self) -> list[any_pb2.Any]:
        return [_pack(error_details_pb2.ErrorInfo(reason=self.reason, domain="numprotect"))]


class Unimplemented(DomainError):
    """An RPC of the contract that this version does not serve yet."""

    code = grpc.StatusCode.UNIMPLEMENTED


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_rpc_status(error: DomainError) -> status_pb2.Status:
    """The google.rpc.Status for a domain error (code, message, typed details)."""
    code_value: int = error.code.value[0]
    assert code_pb2.Code.Name(code_value)  # keeps grpc and google.rpc codes in step
    return status_pb2.Status(code=code_value, message=error.message, details=error.details())
