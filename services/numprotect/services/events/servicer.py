"""The EventService servicer: endpoints (EndpointStore), delivery records and dead letters (Deliveries), replay and
the live watch (EventLog).

Who may call what is the policy table's (numprotect.core.identity.policy): tenants and the operator. Every call
acts for one tenant: a tenant key's own (naming another is PERMISSION_DENIED), or the one the operator names; an
endpoint id is looked up in that tenant's endpoints only, so another tenant's endpoint is NOT_FOUND (no oracle).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, Protocol

import grpc

from numprotect.core.clock import Clock
from numprotect.core.conversions import bounded_duration_ms, seconds_text, timestamp_ms
from numprotect.core.errors import FailedPrecondition, InvalidArgument, NotFound, Violations
from numprotect.core.identifiers import TENANT_ID
from numprotect.core.identity.layer import Callers
from numprotect.core.page_tokens import PageTokenKey, PageTokens
from numprotect.events.v1 import events_pb2, events_pb2_grpc
from numprotect.services.events import validation
from numprotect.services.events.endpoints import EndpointStore, StoredEndpoint
from numprotect.services.events.log import check_cursor
from numprotect.services.events.settings import EventsSettings

Context = grpc.aio.ServicerContext[Any, Any]


class EventSource(Protocol):
    """The tenant event log (log.EventLog)."""

    def watch(
        self, tenant_id: str, event_types: Sequence[str], cursor: str
    ) -> AsyncIterator[tuple[events_pb2.Event, str]]: ...

    async def replay(self, stored: StoredEndpoint, start_ms: int, end_ms: int) -> int: ...


class DeliveryRecords(Protocol):
    """Delivery attempts and dead letters (deliveries.Deliveries)."""

    async def attempts(
        self, tenant_id: str, endpoint_id: str, event_id: str, page_size: int, after: str
    ) -> tuple[list[events_pb2.Delivery], str]: ...

    async def dead_letters(
        self, tenant_id: str, endpoint_id: str, page_size: int, after: str
    ) -> tuple[list[events_pb2.DeadLetter], str]: ...

    async def redrive(self, tenant_id: str, endpoint_id: str, event_ids: Sequence[str]) -> int: ...


class EventServiceServicer(events_pb2_grpc.EventServiceServicer):
    def __init__(
        self,
        settings: EventsSettings,
        endpoints: EndpointStore,
        log: EventSource,
        deliveries: DeliveryRecords,
        *,
        callers: Callers,
        page_token_key: PageTokenKey,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.endpoints = endpoints
        self.log = log
        self.deliveries = deliveries
        self.callers = callers
        self.clock = clock
        self.endpoint_tokens = PageTokens(page_token_key, "events.ListEndpoints")
        self.delivery_tokens = PageTokens(page_token_key, "events.ListDeliveries")
        self.dead_letter_tokens = PageTokens(page_token_key, "events.ListDeadLetters")

    # --- whose endpoints ---------------------------------------------------------------------------

    def _tenant(self, requested: str, field: str = "tenant_id") -> str:
        return self.callers.tenant(requested, field)

    async def _endpoint(self, tenant_id: str, endpoint_id: str) -> StoredEndpoint:
        validation.ids(tenant_id, endpoint_id)
        stored = await self.endpoints.get_stored(tenant_id, endpoint_id)
        if stored is None:
            raise _not_found(tenant_id, endpoint_id)
        return stored

    # --- endpoints ---------------------------------------------------------------------------------

    async def CreateEndpoint(  # noqa: N802
        self, request: events_pb2.CreateEndpointRequest, context: Context
    ) -> events_pb2.CreateEndpointResponse:
        spec = validation.create_spec(request, self._tenant(request.tenant_id), self.settings)
        stored = await self.endpoints.create(spec)
        return events_pb2.CreateEndpointResponse(endpoint=stored.public(self.clock.now_ms(), with_secret=True))

    async def GetEndpoint(  # noqa: N802
        self, request: events_pb2.GetEndpointRequest, context: Context
    ) -> events_pb2.GetEndpointResponse:
        stored = await self._endpoint(self._tenant(request.tenant_id), request.endpoint_id)
        return events_pb2.GetEndpointResponse(endpoint=stored.public(self.clock.now_ms()))

    async def ListEndpoints(  # noqa: N802
        self, request: events_pb2.ListEndpointsRequest, context: Context
    ) -> events_pb2.ListEndpointsResponse:
        tenant_id = self._tenant(request.tenant_id)
        TENANT_ID.check("tenant_id", tenant_id)
        page_size = validation.page_size(request.page_size)
        query = [tenant_id]
        after: tuple[int, str] | None = None
        if request.page_token:
            create_ms, endpoint_id = self.endpoint_tokens.decode(request.page_token, query=query, fields=2)
            if not create_ms.isdigit():
                raise InvalidArgument.field("page_token", self.endpoint_tokens.rule)
            after = (int(create_ms), endpoint_id)
        stored = await self.endpoints.stored(tenant_id)
        if after is not None:
            stored = [s for s in stored if (s.endpoint.create_time.ToMilliseconds(), s.endpoint_id) > after]
        page, more = stored[:page_size], len(stored) > page_size
        token = ""
        if more:
            last = page[-1]
            token = self.endpoint_tokens.encode(
                [str(last.endpoint.create_time.ToMilliseconds()), last.endpoint_id], query=query
            )
        now_ms = self.clock.now_ms()
        return events_pb2.ListEndpointsResponse(endpoints=[s.public(now_ms) for s in page], next_page_token=token)

    async def UpdateEndpoint(  # noqa: N802
        self, request: events_pb2.UpdateEndpointRequest, context: Context
    ) -> events_pb2.UpdateEndpointResponse:
        tenant_id = self._tenant(request.endpoint.tenant_id, "endpoint.tenant_id")
        spec = validation.update_spec(request, tenant_id, self.settings)
        endpoint_id = request.endpoint.endpoint_id

        def update(stored: StoredEndpoint) -> tuple[StoredEndpoint, bool]:
            return stored.changed(spec.apply, self.clock.now_ms()), spec.resumes(stored.endpoint)

        updated = await self.endpoints.change(tenant_id, endpoint_id, update)
        if updated is None:
            raise _not_found(tenant_id, endpoint_id)
        return events_pb2.UpdateEndpointResponse(endpoint=updated.public(self.clock.now_ms()))

    async def RotateEndpointSecret(  # noqa: N802
        self, request: events_pb2.RotateEndpointSecretRequest, context: Context
    ) -> events_pb2.RotateEndpointSecretResponse:
        tenant_id = self._tenant(request.tenant_id)
        validation.ids(tenant_id, request.endpoint_id)
        most_ms = int(self.settings.max_rotation_grace_s * 1000)
        grace_ms = (
            bounded_duration_ms("grace_period", request.grace_period, 0, most_ms)
            if request.HasField("grace_period")
            else int(self.settings.rotation_grace_s * 1000)
        )
        rotated = await self.endpoints.rotate(tenant_id, request.endpoint_id, grace_ms)
        if rotated is None:
            raise _not_found(tenant_id, request.endpoint_id)
        return events_pb2.RotateEndpointSecretResponse(endpoint=rotated.public(self.clock.now_ms(), with_secret=True))

    async def DeleteEndpoint(  # noqa: N802
        self, request: events_pb2.DeleteEndpointRequest, context: Context
    ) -> events_pb2.DeleteEndpointResponse:
        tenant_id = self._tenant(request.tenant_id)
        validation.ids(tenant_id, request.endpoint_id)
        if not await self.endpoints.delete(tenant_id, request.endpoint_id):
            raise _not_found(tenant_id, request.endpoint_id)
        return events_pb2.DeleteEndpointResponse()

    # --- deliveries --------------------------------------------------------------------------------

    async def ListDeliveries(  # noqa: N802
        self, request: events_pb2.ListDeliveriesRequest, context: Context
    ) -> events_pb2.ListDeliveriesResponse:
        tenant_id = self._tenant(request.tenant_id)
        validation.EVENT_ID.check("event_id", request.event_id, required=False)
        page_size = validation.page_size(request.page_size)
        stored = await self._endpoint(tenant_id, request.endpoint_id)
        query = [tenant_id, stored.endpoint_id, request.event_id]
        after = self.delivery_tokens.decode(request.page_token, query=query, fields=1)[0] if request.page_token else ""
        deliveries, following = await self.deliveries.attempts(
            tenant_id, stored.endpoint_id, request.event_id, page_size, after
        )
        token = self.delivery_tokens.encode([following], query=query) if following else ""
        return events_pb2.ListDeliveriesResponse(deliveries=deliveries, next_page_token=token)

    async def ListDeadLetters(  # noqa: N802
        self, request: events_pb2.ListDeadLettersRequest, context: Context
    ) -> events_pb2.ListDeadLettersResponse:
        tenant_id = self._tenant(request.tenant_id)
        page_size = validation.page_size(request.page_size)
        stored = await self._endpoint(tenant_id, request.endpoint_id)
        query = [tenant_id, stored.endpoint_id]
        after = (
            self.dead_letter_tokens.decode(request.page_token, query=query, fields=1)[0] if request.page_token else ""
        )
        letters, following = await self.deliveries.dead_letters(tenant_id, stored.endpoint_id, page_size, after)
        token = self.dead_letter_tokens.encode([following], query=query) if following else ""
        return events_pb2.ListDeadLettersResponse(dead_letters=letters, next_page_token=token)

    async def RedriveDeadLetters(  # noqa: N802
        self, request: events_pb2.RedriveDeadLettersRequest, context: Context
    ) -> events_pb2.RedriveDeadLettersResponse:
        tenant_id = self._tenant(request.tenant_id)
        event_ids = validation.event_ids("event_ids", request.event_ids, most=validation.MAX_REDRIVE_IDS)
        stored = self._enabled(await self._endpoint(tenant_id, request.endpoint_id), "RedriveDeadLetters")
        requeued = await self.deliveries.redrive(tenant_id, stored.endpoint_id, event_ids)
        return events_pb2.RedriveDeadLettersResponse(events_requeued=requeued)

    async def ReplayEvents(  # noqa: N802
        self, request: events_pb2.ReplayEventsRequest, context: Context
    ) -> events_pb2.ReplayEventsResponse:
        tenant_id = self._tenant(request.tenant_id)
        start_ms, end_ms = self._replay_range(request)
        stored = self._enabled(await self._endpoint(tenant_id, request.endpoint_id), "ReplayEvents")
        queued = await self.log.replay(stored, start_ms, end_ms)
        return events_pb2.ReplayEventsResponse(events_queued=queued)

    def _replay_range(self, request: events_pb2.ReplayEventsRequest) -> tuple[int, int]:
        v = Violations()
        bounds: list[int] = []
        for field in ("start_time", "end_time"):
            if not request.HasField(field):
                v.add(field, "is required ([start_time, end_time) of the events to send again)")
                continue
            try:
                bounds.append(timestamp_ms(field, getattr(request, field)))
            except InvalidArgument as exc:
                v.items.extend(exc.violations)
        v.raise_if_any()
        start_ms, end_ms = bounds
        retention_ms = int(self.settings.retention_s * 1000)
        oldest_ms = self.clock.now_ms() - retention_ms
        if end_ms <= start_ms:
            v.add("end_time", "must be after start_time")
        if start_ms < oldest_ms:
            v.add(
                "start_time",
                f"must be within the event retention (NUMPROTECT_EVENTS_RETENTION, {seconds_text(retention_ms)}): "
                "events older than that are no longer kept",
            )
        v.raise_if_any()
        return start_ms, end_ms

    @staticmethod
    def _enabled(stored: StoredEndpoint, method: str) -> StoredEndpoint:
        if not stored.enabled:
            state = events_pb2.EndpointState.Name(stored.endpoint.state)
            raise FailedPrecondition(
                f"endpoint {stored.endpoint_id} is {state}: {method} queues events only for an enabled endpoint "
                "(UpdateEndpoint with state ENDPOINT_STATE_ENABLED first)",
                type_="ENDPOINT_STATE",
                subject=stored.endpoint_id,
            )
        return stored

    # --- watch -------------------------------------------------------------------------------------

    async def WatchEvents(  # noqa: N802
        self, request: events_pb2.WatchEventsRequest, context: Context
    ) -> AsyncIterator[events_pb2.WatchEventsResponse]:
        # The log read is the caller's own tenant's (or the one the operator names): a cursor only moves within it.
        # The log bounds the watches (per process, per tenant) and ends them on shutdown.
        tenant_id = self._tenant(request.tenant_id)
        v = Violations()
        v.identifier(TENANT_ID, "tenant_id", tenant_id)
        types = validation.event_types("event_types", request.event_types, v)
        v.raise_if_any()
        check_cursor(request.cursor)
        events = self.log.watch(tenant_id, types, request.cursor)
        try:
            async for event, cursor in events:
                yield events_pb2.WatchEventsResponse(event=event, cursor=cursor)
        finally:
            # At once, not when the generator is collected: a cancelled watch gives its places back now.
            if isinstance(events, AsyncGenerator):
                await events.aclose()


def _not_found(tenant_id: str, endpoint_id: str) -> NotFound:
    return NotFound(
        f"endpoint {endpoint_id} not found for tenant {tenant_id}",
        resource_type="numprotect.events.v1.Endpoint",
        resource_name=endpoint_id,
    )
