"""The binding service's client of the allocation service (gRPC; trace context flows with each call).

Reservations, confirmations and cancellations go through allocation's batch RPCs (AllocateNumbers,
ConfirmReservations, CancelReservations), batched naturally (batching.py): concurrent creates share one call, a lone
one goes at once. Each caller still gets exactly the answer, and the error, of its own unary call. An allocation
without the batch RPCs (UNIMPLEMENTED: an older version during an upgrade) is called item by item instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from opentelemetry import trace

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
from numprotect.services.binding.batching import Batcher, BatchLimits

log = logging.getLogger(__name__)
_CODES = {code.value[0]: code for code in grpc.StatusCode}
RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")


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


@dataclass(frozen=True)
class Refusal:
    """How allocation refused one request: a unary call's error, a batch item's google.rpc.Status, or a request
    that got no answer in time (the message a grpc client gives then: "Deadline Exceeded")."""

    code: grpc.StatusCode
    message: str | None

    @classmethod
    def of_call(cls, exc: grpc.aio.AioRpcError) -> Refusal:
        return cls(exc.code(), exc.details())

    @classmethod
    def of_status(cls, status: status_pb2.Status) -> Refusal:
        return cls(_CODES.get(status.code, grpc.StatusCode.UNKNOWN), status.message)

    @classmethod
    def unanswered(cls, code: grpc.StatusCode) -> Refusal:
        return cls(code, {grpc.StatusCode.DEADLINE_EXCEEDED: "Deadline Exceeded"}.get(code, code.name))


def _as_domain_error(refusal: Refusal, what: str) -> DomainError:
    """Allocation's answer as the error this service returns (its message kept, prefixed by the step)."""
    code = refusal.code
    message = f"allocation {what}: {refusal.message or code.name}"
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


class _BatchedRpc(Generic[RequestT, ResponseT]):
    """One reservation RPC called through its batch form: `call(request, timeout)` is the response or a Refusal."""

    def __init__(
        self,
        batch: Callable[..., Awaitable[Any]],
        batch_request: Callable[..., Any],
        unary: Callable[..., Awaitable[ResponseT]],
        limits: BatchLimits,
        tracer: trace.Tracer | None,
    ) -> None:
        self._batch = batch
        self._batch_request = batch_request
        self._unary = unary
        self._method = batch_request.DESCRIPTOR.name.removesuffix("Request")  # type: ignore[attr-defined]
        self.batcher: Batcher[RequestT, ResponseT | Refusal] = Batcher(
            self._send, limits, Refusal.unanswered, method=self._method, tracer=tracer
        )
        self._warned = False

    async def call(self, request: RequestT, within: float) -> ResponseT | Refusal:
        return await self.batcher.submit(request, within)

    async def _send(self, requests: list[RequestT], within: float) -> list[ResponseT | Refusal]:
        try:
            reply = await self._batch(self._batch_request(requests=requests), timeout=within)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return await self._one_by_one(requests, within)
            return [Refusal.of_call(exc)] * len(requests)
        results = reply.results
        if len(results) != len(requests):
            refusal = Refusal(grpc.StatusCode.UNKNOWN, f"{len(results)} results for {len(requests)} requests")
            return [refusal] * len(requests)
        return [_outcome(result) for result in results]

    async def _one_by_one(self, requests: list[RequestT], within: float) -> list[ResponseT | Refusal]:
        """An allocation without the batch RPCs (older, during an upgrade): each request in its own call."""
        if not self._warned:
            self._warned = True
            log.warning("allocation has no batch RPCs: calling it item by item", extra={"rpc": self._method})
        return list(await asyncio.gather(*(self._single(request, within) for request in requests)))

    async def _single(self, request: RequestT, within: float) -> ResponseT | Refusal:
        try:
            return await self._unary(request, timeout=within)
        except grpc.aio.AioRpcError as exc:
            return Refusal.of_call(exc)


def _outcome(result: Any) -> Any:
    """A batch result's response, or its error as a Refusal."""
    kind = result.WhichOneof("result")
    if kind == "response":
        return result.response
    if kind == "error":
        return Refusal.of_status(result.error)
    return Refusal(grpc.StatusCode.UNKNOWN, "no result for this request")


class AllocationClient:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        timeout_seconds: float,
        *,
        batching: BatchLimits | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        """`batching`: how reservations are batched (default BatchLimits()); `tracer`: for the batch spans (None
        when tracing is off)."""
        self.stub = allocation_pb2_grpc.AllocationServiceStub(channel)
        self.timeout = timeout_seconds
        limits = batching or BatchLimits()
        stub = self.stub
        self.allocations: _BatchedRpc[pb.AllocateNumberRequest, pb.AllocateNumberResponse] = _BatchedRpc(
            stub.AllocateNumbers, pb.AllocateNumbersRequest, stub.AllocateNumber, limits, tracer
        )
        self.confirmations: _BatchedRpc[pb.ConfirmReservationRequest, pb.ConfirmReservationResponse] = _BatchedRpc(
            stub.ConfirmReservations, pb.ConfirmReservationsRequest, stub.ConfirmReservation, limits, tracer
        )
        self.cancellations: _BatchedRpc[pb.CancelReservationRequest, pb.CancelReservationResponse] = _BatchedRpc(
            stub.CancelReservations, pb.CancelReservationsRequest, stub.CancelReservation, limits, tracer
        )

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
        reply = await self.allocations.call(request, self.timeout)
        if isinstance(reply, Refusal):
            raise _as_domain_error(reply, "AllocateNumber")
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
        refusal = await self.confirmations.call(request, self.timeout)
        if isinstance(refusal, Refusal):
            if refusal.code == grpc.StatusCode.NOT_FOUND:
                # The reservation lapsed (the create outran its lease) or was cancelled: a retry starts afresh.
                raise Aborted(f"allocation ConfirmReservation: {refusal.message}; retry")
            raise _as_domain_error(refusal, "ConfirmReservation")

    async def cancel(self, reservation_id: str, reason: str) -> None:
        request = pb.CancelReservationRequest(reservation_id=reservation_id, reason=reason)
        refusal = await self.cancellations.call(request, self.timeout)
        if isinstance(refusal, Refusal):
            raise _as_domain_error(refusal, "CancelReservation")

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
            raise _as_domain_error(Refusal.of_call(exc), "ReplaceParty") from None
        return reply.reservation_id
