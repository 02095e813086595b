"""The binding service's client of the allocation service (gRPC; trace context flows with each call)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from numprotect.allocation.v1 import allocation_pb2 as pb
from numprotect.allocation.v1 import allocation_pb2_grpc
from numprotect.core.conversions import duration_from_ms, timestamp_from_ms
from numprotect.core.errors import (
    Aborted,
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Allocation:
    virtual_number: str
    extension: str
    city_code: str
    city_fallback: bool
    reservation_id: str
    # When the reservation lapses unless confirmed (allocation's Redis clock).
    lease_expire_ms: int


class PartyNotHeld(FailedPrecondition):
    """ReplaceParty: the old party is not on the reservation (allocation's PreconditionFailure type PARTY)."""


def _precondition_types(exc: grpc.aio.AioRpcError) -> set[str]:
    """The PreconditionFailure violation types of an answer's google.rpc details."""
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    types: set[str] = set()
    for detail in status.details if status is not None else ():
        failure = error_details_pb2.PreconditionFailure()
        if detail.Unpack(failure):
            types.update(violation.type for violation in failure.violations)
    return types


def _as_domain_error(exc: grpc.aio.AioRpcError, what: str) -> DomainError:
    """Allocation's answer as the error this service returns (its message kept, prefixed by the step)."""
    code = exc.code()
    message = f"allocation {what}: {exc.details() or code.name}"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(message, subject="allocation")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPrecondition(message, subject="allocation")
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(message)
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return AlreadyExists(message)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        # Our own validation runs first, so this names what allocation alone knows (e.g. a city without pool).
        return InvalidArgument.field("allocation", message)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        # Binding's own credential was refused: a deployment fault, not the caller's. The caller may retry once the
        # operator has fixed NUMPROTECT_SERVICE_TOKEN_FILE (or the workload certificate); the token is not logged.
        log.error("allocation refused binding's service credential", extra={"rpc": what, "code": code.name})
        return Unavailable(f"allocation {what}: refused the binding service's credential ({code.name}); retry later")
    # UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, ...: allocation cannot answer now; the caller may retry.
    return Unavailable(message)


class AllocationClient:
    def __init__(self, channel: grpc.aio.Channel, timeout_seconds: float) -> None:
        self.stub = allocation_pb2_grpc.AllocationServiceStub(channel)
        self.timeout = timeout_seconds

    async def allocate(
        self, tenant_id: str, mode: int, parties: Sequence[str], city_code: str, strict_city: bool, lease_ms: int
    ) -> Allocation:
        request = pb.AllocateNumberRequest(
            tenant_id=tenant_id,
            mode=mode,  # type: ignore[arg-type]
            parties=list(parties),
            city_code=city_code,
            strict_city=strict_city,
            lease=duration_from_ms(lease_ms),
        )
        try:
            reply = await self.stub.AllocateNumber(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise _as_domain_error(exc, "AllocateNumber") from None
        return Allocation(
            virtual_number=reply.virtual_number,
            extension=reply.extension,
            city_code=reply.city_code,
            city_fallback=reply.city_fallback,
            reservation_id=reply.reservation_id,
            lease_expire_ms=reply.lease_expire_time.seconds * 1000 + reply.lease_expire_time.nanos // 1_000_000,
        )

    async def confirm(self, reservation_id: str, binding_id: str, expire_ms: int) -> None:
        request = pb.ConfirmReservationRequest(
            reservation_id=reservation_id, binding_id=binding_id, expire_time=timestamp_from_ms(expire_ms)
        )
        try:
            await self.stub.ConfirmReservation(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                # The reservation lapsed (the create outran its lease) or was cancelled: a retry starts afresh.
                raise Aborted(f"allocation ConfirmReservation: {exc.details()}; retry") from None
            raise _as_domain_error(exc, "ConfirmReservation") from None

    async def cancel(self, reservation_id: str, reason: str) -> None:
        request = pb.CancelReservationRequest(reservation_id=reservation_id, reason=reason)
        try:
            await self.stub.CancelReservation(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise _as_domain_error(exc, "CancelReservation") from None

    async def replace_party(self, reservation_id: str, old_party: str, new_party: str) -> str:
        request = pb.ReplacePartyRequest(reservation_id=reservation_id, old_party=old_party, new_party=new_party)
        try:
            reply = await self.stub.ReplaceParty(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                # Not the binding that is missing but its reservation (lapsed at expiry): the binding cannot change.
                raise FailedPrecondition(f"allocation ReplaceParty: {exc.details()}", subject="allocation") from None
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and "PARTY" in _precondition_types(exc):
                raise PartyNotHeld(f"allocation ReplaceParty: {exc.details()}", subject="allocation") from None
            raise _as_domain_error(exc, "ReplaceParty") from None
        return reply.reservation_id
