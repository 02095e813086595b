"""The AllocationService servicer: validates requests, calls NumberPools, converts to protobuf."""

# ruff: noqa: N802  (RPC method names come from the proto)

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from google.rpc import status_pb2

from numprotect.allocation.v1 import allocation_pb2 as pb
from numprotect.allocation.v1 import allocation_pb2_grpc
from numprotect.common.v1 import common_pb2
from numprotect.core import pool_keys
from numprotect.core.calls import rpc_status_of
from numprotect.core.clock import Clock
from numprotect.core.conversions import bounded_duration_ms, timestamp_from_ms, timestamp_ms
from numprotect.core.errors import FieldViolation, InvalidArgument
from numprotect.core.identifiers import BINDING_ID, CARRIER_ID, TENANT_ID
from numprotect.core.identity.layer import Callers
from numprotect.core.page_tokens import PageTokenKey, PageTokens
from numprotect.core.phone import InvalidNumber, party_field, validate_block, virtual_field
from numprotect.core.telemetry import set_span_attributes
from numprotect.services.allocation import keys
from numprotect.services.allocation.pools import MODES, Event, HistoryCursor, NumberInfo, NumberPools, PoolStats, summed
from numprotect.services.allocation.settings import AllocationSettings

_MODE_NAMES = {
    common_pb2.BINDING_MODE_AXB: "AXB",
    common_pb2.BINDING_MODE_AXN: "AXN",
    common_pb2.BINDING_MODE_AXE: "AXE",
}
_MODE_ENUMS = {name: value for value, name in _MODE_NAMES.items()}
_STATES = {
    "AVAILABLE": pb.NUMBER_STATE_AVAILABLE,
    "IN_USE": pb.NUMBER_STATE_IN_USE,
    "LOCKED": pb.NUMBER_STATE_LOCKED,
    "COOLING": pb.NUMBER_STATE_COOLING,
}
_TEXT_LIMIT = 256
# Items a batch RPC (AllocateNumbers, ConfirmReservations, CancelReservations) carries at most: a bound on the
# work and memory of one call (binding's NUMPROTECT_BINDING_ALLOCATION_MAX_BATCH stays within it).
MAX_BATCH_ITEMS = 256
RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")
ResultT = TypeVar("ResultT")
_MAX_PAGE = 1000
_DEFAULT_PAGE = 100


def _short_text(field: str, value: str, *, required: bool = False) -> str:
    if required and not value.strip():
        raise InvalidArgument.field(field, "is required")
    if len(value) > _TEXT_LIMIT:
        raise InvalidArgument.field(field, f"must be at most {_TEXT_LIMIT} characters")
    if "|" in value:
        raise InvalidArgument.field(field, "must not contain '|'")
    return value


def _number_info(info: NumberInfo) -> pb.NumberInfo:
    message = pb.NumberInfo(
        virtual_number=info.number,
        tenant_id=info.tenant,
        city_code=info.city,
        state=_STATES[info.state],
        active_bindings=info.live,
        lock_reason=info.lock_reason,
        mode=_MODE_ENUMS.get(info.mode, common_pb2.BINDING_MODE_UNSPECIFIED),
    )
    if info.cooling_until_ms:
        message.cooling_until.CopyFrom(timestamp_from_ms(info.cooling_until_ms))
    return message


def _pool_figures(stats: PoolStats) -> dict[str, Any]:
    """The fields GetPoolStatsResponse and CityPoolStats share."""
    return {
        "total": stats.total,
        "available": stats.available,
        "in_use": stats.in_use,
        "locked": stats.locked,
        "cooling": stats.cooling,
        "net_taken": stats.net_taken,
        "net_taken_per_day": stats.net_taken_per_day,
    }


def _event(event: Event) -> pb.NumberEvent:
    return pb.NumberEvent(
        time=timestamp_from_ms(event.time_ms),
        kind=event.kind,
        actor=event.actor,
        reason=event.reason,
        tenant_id=event.tenant,
        binding_id=event.binding_id,
        detail=event.detail,
    )


async def _each(
    requests: Sequence[RequestT], serve: Callable[[RequestT], Awaitable[ResponseT]], method: str
) -> list[ResponseT | status_pb2.Status]:
    """A batch RPC's items served concurrently (their Redis commands go out together), each as its unary call
    `method` would serve it: its response, or the google.rpc.Status that call would have ended with."""
    if len(requests) > MAX_BATCH_ITEMS:
        raise InvalidArgument.field(
            "requests", f"takes at most {MAX_BATCH_ITEMS} items (send more in several calls), not {len(requests)}"
        )
    set_span_attributes(batch_items=len(requests))
    if len(requests) == 1:  # no task to spawn
        try:
            return [await serve(requests[0])]
        except Exception as exc:  # made a status here: kept, its traceback would hold this frame in a cycle
            return [rpc_status_of(exc, method)]
    outcomes = await asyncio.gather(*(serve(r) for r in requests), return_exceptions=True)
    answers: list[ResponseT | status_pb2.Status] = []
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            answers.append(rpc_status_of(outcome, method))
        elif isinstance(outcome, BaseException):  # cancelled: the whole call ends
            raise outcome
        else:
            answers.append(outcome)
    return answers


def _results(result: Callable[..., ResultT], outcomes: list[Any]) -> list[ResultT]:
    """The batch response's results: each item's response, or its error (a google.rpc.Status)."""
    return [result(error=o) if isinstance(o, status_pb2.Status) else result(response=o) for o in outcomes]


class AllocationServiceServicer(allocation_pb2_grpc.AllocationServiceServicer):
    def __init__(
        self,
        pools: NumberPools,
        settings: AllocationSettings,
        page_token_key: PageTokenKey,
        callers: Callers,
        clock: Clock,
    ) -> None:
        self.pools = pools
        self.settings = settings
        # Who calls (the call layer checked the role; the servicer applies the tenant scope: docs/allocation.md).
        self.callers = callers
        self.clock = clock
        self.history_tokens = PageTokens(page_token_key, "allocation.ListNumberHistory")

    async def ImportBlock(self, request: pb.ImportBlockRequest, context: Any) -> pb.ImportBlockResponse:
        violations: list[FieldViolation] = []
        try:
            validate_block(request.block)
        except InvalidNumber as exc:
            violations.append(FieldViolation("block", str(exc)))
        for problem in (
            TENANT_ID.violation("tenant_id", request.tenant_id),
            CARRIER_ID.violation("carrier_id", request.carrier_id),
        ):
            if problem is not None:
                violations.append(problem)
        try:
            keys.city_field("city_code", request.city_code)
        except InvalidArgument as exc:
            violations.extend(exc.violations)
        if violations:
            raise InvalidArgument(violations)
        actor = _short_text("actor", request.actor)
        added = await self.pools.import_block(
            request.block, request.tenant_id, request.city_code, request.carrier_id, actor
        )
        return pb.ImportBlockResponse(block=request.block, numbers_added=added, already_imported=added == 0)

    async def AllocateNumber(self, request: pb.AllocateNumberRequest, context: Any) -> pb.AllocateNumberResponse:
        return await self._allocate(request, annotate=True)

    async def AllocateNumbers(self, request: pb.AllocateNumbersRequest, context: Any) -> pb.AllocateNumbersResponse:
        outcomes = await _each(request.requests, self._allocate, "AllocateNumber")
        return pb.AllocateNumbersResponse(results=_results(pb.AllocateNumberResult, outcomes))

    async def _allocate(
        self, request: pb.AllocateNumberRequest, *, annotate: bool = False
    ) -> pb.AllocateNumberResponse:
        """AllocateNumber for one request; `annotate`: the call's span describes it (not so for a batch item)."""
        tenant = TENANT_ID.check("tenant_id", self.callers.tenant(request.tenant_id))
        mode = _MODE_NAMES.get(request.mode)
        if mode is None:
            raise InvalidArgument.field("mode", f"must be one of {', '.join('BINDING_MODE_' + m for m in MODES)}")
        if len(request.parties) > 2:  # before reading each one: a request may carry thousands
            raise InvalidArgument.field("parties", "takes at most two parties: [A, B], or [A] / [A, N] for AXN")
        parties = [party_field(f"parties[{i}]", raw) for i, raw in enumerate(request.parties)]
        if mode == "AXN":
            if not 1 <= len(parties) <= 2:
                raise InvalidArgument.field("parties", "AXN takes [A] or [A, N]")
        elif len(parties) != 2:
            raise InvalidArgument.field("parties", f"{mode} takes exactly two parties [A, B]")
        if len(parties) == 2 and parties[0] == parties[1]:
            raise InvalidArgument.field("parties[1]", "must differ from parties[0]")
        city = keys.city_field("city_code", request.city_code)
        lease = self.settings.default_lease_seconds
        if request.HasField("lease"):
            most_ms = round(self.settings.max_lease_seconds * 1000)
            setting = "NUMPROTECT_ALLOCATION_MAX_LEASE"
            lease = bounded_duration_ms("lease", request.lease, 100, most_ms, setting=setting) / 1000
        if annotate:
            set_span_attributes(tenant=tenant, mode=mode, city_code=city, strict_city=request.strict_city)
        allocation = await self.pools.allocate(tenant, mode, parties, city, request.strict_city, lease)
        if annotate:
            set_span_attributes(virtual_number=allocation.number, city_fallback=allocation.city_fallback)
        return pb.AllocateNumberResponse(
            virtual_number=allocation.number,
            extension=allocation.extension,
            city_code=allocation.city,
            city_fallback=allocation.city_fallback,
            reservation_id=allocation.reservation_id,
            lease_expire_time=timestamp_from_ms(allocation.expire_ms),
        )

    async def ConfirmReservation(
        self, request: pb.ConfirmReservationRequest, context: Any
    ) -> pb.ConfirmReservationResponse:
        return await self._confirm(request)

    async def ConfirmReservations(
        self, request: pb.ConfirmReservationsRequest, context: Any
    ) -> pb.ConfirmReservationsResponse:
        outcomes = await _each(request.requests, self._confirm, "ConfirmReservation")
        return pb.ConfirmReservationsResponse(results=_results(pb.ConfirmReservationResult, outcomes))

    async def _confirm(self, request: pb.ConfirmReservationRequest) -> pb.ConfirmReservationResponse:
        handle = pool_keys.Handle.decode("reservation_id", request.reservation_id)
        # The id binding issued: it is stored with the number and shown in its history (ListNumberHistory).
        binding_id = BINDING_ID.check("binding_id", request.binding_id)
        if not request.HasField("expire_time"):
            raise InvalidArgument.field("expire_time", "is required")
        expire_ms = timestamp_ms("expire_time", request.expire_time)
        # A reservation never outlives the longest binding: a far-future expiry would hold the number forever.
        lifetime = self.settings.max_binding_lifetime_seconds
        if expire_ms > self.clock.now_ms() + round(lifetime * 1000):
            raise InvalidArgument.field(
                "expire_time", f"must be at most {lifetime:g}s from now (NUMPROTECT_MAX_BINDING_LIFETIME)"
            )
        await self.pools.confirm(handle, binding_id, expire_ms)
        return pb.ConfirmReservationResponse()

    async def CancelReservation(
        self, request: pb.CancelReservationRequest, context: Any
    ) -> pb.CancelReservationResponse:
        return await self._cancel(request)

    async def CancelReservations(
        self, request: pb.CancelReservationsRequest, context: Any
    ) -> pb.CancelReservationsResponse:
        outcomes = await _each(request.requests, self._cancel, "CancelReservation")
        return pb.CancelReservationsResponse(results=_results(pb.CancelReservationResult, outcomes))

    async def _cancel(self, request: pb.CancelReservationRequest) -> pb.CancelReservationResponse:
        handle = pool_keys.Handle.decode("reservation_id", request.reservation_id)
        reason = _short_text("reason", request.reason) or "cancelled"
        await self.pools.cancel(handle, reason)
        return pb.CancelReservationResponse()

    async def ReplaceParty(self, request: pb.ReplacePartyRequest, context: Any) -> pb.ReplacePartyResponse:
        handle = pool_keys.Handle.decode("reservation_id", request.reservation_id)
        old_party = party_field("old_party", request.old_party)
        new_party = party_field("new_party", request.new_party)
        if old_party == new_party:
            raise InvalidArgument.field("new_party", "must differ from old_party")
        new_handle = await self.pools.replace(handle, old_party, new_party)
        return pb.ReplacePartyResponse(reservation_id=new_handle.encode())

    async def ReleaseNumber(self, request: pb.ReleaseNumberRequest, context: Any) -> pb.ReleaseNumberResponse:
        number = virtual_field("virtual_number", request.virtual_number)
        actor = _short_text("actor", request.actor)
        reason = _short_text("reason", request.reason)
        return pb.ReleaseNumberResponse(number=_number_info(await self.pools.release(number, actor, reason)))

    async def LockNumber(self, request: pb.LockNumberRequest, context: Any) -> pb.LockNumberResponse:
        number = virtual_field("virtual_number", request.virtual_number)
        reason = _short_text("reason", request.reason, required=True)
        actor = _short_text("actor", request.actor)
        return pb.LockNumberResponse(number=_number_info(await self.pools.lock(number, reason, actor)))

    async def UnlockNumber(self, request: pb.UnlockNumberRequest, context: Any) -> pb.UnlockNumberResponse:
        number = virtual_field("virtual_number", request.virtual_number)
        actor = _short_text("actor", request.actor)
        return pb.UnlockNumberResponse(number=_number_info(await self.pools.unlock(number, actor)))

    async def GetNumber(self, request: pb.GetNumberRequest, context: Any) -> pb.GetNumberResponse:
        number = virtual_field("virtual_number", request.virtual_number)
        # No tenant_id in the request: a tenant sees only numbers of its own blocks (another's is NOT_FOUND).
        info = await self.pools.get(number, visible=self.callers.may_see_tenant)
        return pb.GetNumberResponse(number=_number_info(info))

    async def GetPoolStats(self, request: pb.GetPoolStatsRequest, context: Any) -> pb.GetPoolStatsResponse:
        tenant = TENANT_ID.check("tenant_id", self.callers.tenant(request.tenant_id))
        city = keys.city_field("city_code", request.city_code) if request.city_code else None
        per_city = await self.pools.city_stats(tenant, city)
        stats = summed(per_city)
        # One rate window for the response (the last city's read): every rate in it is per day of rate_window.
        cities = [pb.CityPoolStats(city_code=c, **_pool_figures(replace(s, now_ms=stats.now_ms))) for c, s in per_city]
        response = pb.GetPoolStatsResponse(**_pool_figures(stats), cities=cities)
        if stats.now_ms:
            response.rate_window.FromMilliseconds(stats.rate_window_ms)
        return response

    async def ListNumberHistory(
        self, request: pb.ListNumberHistoryRequest, context: Any
    ) -> pb.ListNumberHistoryResponse:
        number = virtual_field("virtual_number", request.virtual_number)
        if request.page_size < 0 or request.page_size > _MAX_PAGE:
            raise InvalidArgument.field("page_size", f"must be between 0 and {_MAX_PAGE} (0: {_DEFAULT_PAGE})")
        page_size = request.page_size or _DEFAULT_PAGE
        after = None
        if request.page_token:
            after = HistoryCursor(*self.history_tokens.decode(request.page_token, query=[number], fields=2))
        # A regulator's reason is required by the call layer and recorded in the audit trail there.
        if len(request.reason) > _TEXT_LIMIT:
            raise InvalidArgument.field("reason", f"must be at most {_TEXT_LIMIT} characters")
        events, following = await self.pools.history(number, page_size, after, visible=self.callers.may_see_tenant)
        token = self.history_tokens.encode(following, query=[number]) if following is not None else ""
        return pb.ListNumberHistoryResponse(events=[_event(e) for e in events], next_page_token=token)
