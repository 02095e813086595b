"""The BindingService servicer: idempotent creates, updates, deletes, queries and traces of bindings.

Write order of a create (each step's keys live in their own slot; see docs/binding.md for the failure analysis):
 1. claim the order key `np:ord:{tenant:order}` (pending, with a deadline = now + create lease)
 2. AllocateNumber over gRPC (its reservation lapses after the same lease unless confirmed)
 3. record (status pending) + per-number history + tenant index, concurrently
 4. route keys (PXAT expiry): translation can connect from here on
 5. ConfirmReservation (the reservation now lasts until the binding's expiry)
 6. record status committed (kept from now on for end + retention; a pending one lives a day at most)
 7. order key done (guarded: only while the claim is still ours) -- the commit point
A failure in 2-7 undoes everything written (routes, reservation, record, history, index, claim) and the error
is returned; a crash leaves a pending claim whose deadline passes, after which a repeated create cleans up what
the crashed one left and then takes the order over.
"""

# ruff: noqa: N802  (RPC method names come from the proto)

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Iterable
from dataclasses import replace
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from numprotect.binding.v1 import binding_pb2 as pb
from numprotect.binding.v1 import binding_pb2_grpc
from numprotect.common.v1 import common_pb2
from numprotect.core.binding_records import (
    BindingEvent,
    BindingRecord,
    BindingRecordStore,
    StoredBinding,
    get_stored_bindings,
    now_ms,
    trace_number,
)
from numprotect.core.errors import Aborted as AbortedError
from numprotect.core.errors import AlreadyExists, DomainError, FailedPrecondition, NotFound
from numprotect.core.phone import mask, party_field, virtual_field
from numprotect.core.redis_client import RedisClient
from numprotect.core.routes import MODE_AXB, MODE_AXN, Route, RouteConflictError, RouteTable, caller_key
from numprotect.core.telemetry import set_span_attributes
from numprotect.services.binding.allocation_client import AllocationClient
from numprotect.services.binding.settings import BindingSettings
from numprotect.services.binding.store import (
    Claim,
    MutationLocks,
    OrderClaims,
    TenantIndex,
    decode_page_token,
    encode_page_token,
    fingerprint,
    new_binding_id,
)
from numprotect.services.binding.validation import (
    MODES,
    CreateSpec,
    UpdateSpec,
    Violations,
    create_spec,
    extension_filter,
    ids,
    update_spec,
)
from numprotect.services.binding.validation import order_id as check_order
from numprotect.services.binding.validation import tenant_id as check_tenant

log = logging.getLogger(__name__)

_DEFAULT_PAGE = 100
# How long the record of an uncommitted create is kept: long enough for a retry to find and clean up what a
# crashed create left (routes, reservation), short enough that abandoned creates leave no lasting garbage.
_PENDING_KEEP_MS = 86_400_000
_MAX_PAGE = 1000


def _timestamp(ms: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


def _state(record: BindingRecord, now: int) -> int:
    if record.delete_ms:
        return common_pb2.BINDING_STATE_DELETED
    if record.expire_ms <= now:
        return common_pb2.BINDING_STATE_EXPIRED
    return common_pb2.BINDING_STATE_ACTIVE


def to_proto(record: BindingRecord, *, city_fallback: bool = False, now: int | None = None) -> pb.Binding:
    message = pb.Binding(
        binding_id=record.binding_id,
        tenant_id=record.tenant_id,
        out_order_id=record.out_order_id,
        mode=record.mode,  # type: ignore[arg-type]
        party_a=record.party_a,
        party_b=record.party_b,
        virtual_number=record.virtual_number,
        extension=record.extension,
        city_code=record.city_code,
        call_restriction=record.call_restriction,  # type: ignore[arg-type]
        recording_enabled=record.recording_enabled,
        create_time=_timestamp(record.create_ms),
        expire_time=_timestamp(record.expire_ms),
        state=_state(record, now_ms() if now is None else now),  # type: ignore[arg-type]
        user_consent=record.user_consent,
        allow_any_caller=record.allow_any_caller,
        update_time=_timestamp(record.update_ms),
        city_fallback=city_fallback,
    )
    if record.delete_ms:
        message.delete_time.CopyFrom(_timestamp(record.delete_ms))
    return message


_EVENT_FIELDS = {"b": "party_b", "exp": "expire_time", "r": "call_restriction", "rec": "recording_enabled"}


def event_to_proto(event: BindingEvent) -> pb.BindingEvent:
    message = pb.BindingEvent(
        time=_timestamp(event.at_ms),
        kind=event.kind,
        changed_fields=[_EVENT_FIELDS[k] for k in event.changes if k in _EVENT_FIELDS],
        party_b=event.changes.get("b", ""),
        call_restriction=int(event.changes.get("r", "0")),  # type: ignore[arg-type]
        recording_enabled=event.changes.get("rec") == "1",
    )
    if "exp" in event.changes:
        message.expire_time.CopyFrom(_timestamp(int(event.changes["exp"])))
    return message


def route_of(record: BindingRecord) -> Route:
    return Route(
        binding_id=record.binding_id,
        tenant_id=record.tenant_id,
        mode=record.mode,
        party_a=record.party_a,
        party_b=record.party_b,
        call_restriction=record.call_restriction,
        recording_enabled=record.recording_enabled,
        allow_any_caller=record.allow_any_caller,
        expire_ms=record.expire_ms,
    )


async def _all(steps: Iterable[Awaitable[Any]]) -> list[Any]:
    """Runs steps concurrently and waits for all of them; then raises the first failure, if any."""
    results = await asyncio.gather(*steps, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


class BindingServiceServicer(binding_pb2_grpc.BindingServiceServicer):
    def __init__(
        self, redis: RedisClient, allocation: AllocationClient, settings: BindingSettings, *, max_calls: int = 21
    ) -> None:
        self.redis = redis
        self._calls = asyncio.Semaphore(max_calls)
        self.allocation = allocation
        self.settings = settings
        self.retention_ms = int(settings.history_retention_seconds * 1000)
        self.max_ttl_ms = int(settings.max_ttl_seconds * 1000)
        self.lease_ms = int(settings.create_lease_seconds * 1000)
        self.records = BindingRecordStore(redis, self.retention_ms)
        self.routes = RouteTable(redis)
        self.orders = OrderClaims(redis)
        self.tenants = TenantIndex(redis, self.retention_ms, self.max_ttl_ms)
        self.locks = MutationLocks(redis, self.lease_ms)

    # ----- the RPCs: each waits for a share of the Redis connection pool -----

    async def CreateBinding(self, request: pb.CreateBindingRequest, context: Any) -> pb.CreateBindingResponse:
        async with self._calls:
            return await self._CreateBinding(request, context)

    async def GetBinding(self, request: pb.GetBindingRequest, context: Any) -> pb.GetBindingResponse:
        async with self._calls:
            return await self._GetBinding(request, context)

    async def UpdateBinding(self, request: pb.UpdateBindingRequest, context: Any) -> pb.UpdateBindingResponse:
        async with self._calls:
            return await self._UpdateBinding(request, context)

    async def DeleteBinding(self, request: pb.DeleteBindingRequest, context: Any) -> pb.DeleteBindingResponse:
        async with self._calls:
            return await self._DeleteBinding(request, context)

    async def ListBindings(self, request: pb.ListBindingsRequest, context: Any) -> pb.ListBindingsResponse:
        async with self._calls:
            return await self._ListBindings(request, context)

    async def TraceNumber(self, request: pb.TraceNumberRequest, context: Any) -> pb.TraceNumberResponse:
        async with self._calls:
            return await self._TraceNumber(request, context)

    # ----- create -----

    async def _CreateBinding(self, request: pb.CreateBindingRequest, context: Any) -> pb.CreateBindingResponse:
        spec = create_spec(
            request,
            min_ttl_ms=int(self.settings.min_ttl_seconds * 1000),
            max_ttl_ms=self.max_ttl_ms,
            default_ttl_ms=int(self.settings.default_ttl_seconds * 1000),
        )
        fp = fingerprint(spec.mode, spec.party_a, spec.party_b)
        set_span_attributes(tenant=spec.tenant_id, mode=MODES[spec.mode], out_order_id=spec.out_order_id)
        give_up = time.monotonic() + self.settings.create_lease_seconds + 1.0
        binding_id = new_binding_id(now_ms())
        cleaned = ""
        while True:
            create_ms = now_ms()
            deadline_ms = create_ms + self.lease_ms
            expire_ms = create_ms + spec.ttl_ms
            claim = await self.orders.claim(
                spec.tenant_id,
                spec.out_order_id,
                binding_id,
                fp,
                deadline_ms,
                expire_ms + self.retention_ms,
                cleaned=cleaned,
            )
            if claim.outcome in ("claimed", "taken"):
                break
            if claim.outcome == "stale":
                # A create of this order crashed or got stuck past its deadline: remove what it left (a failure
                # here leaves its claim as it was, so the next retry cleans again), then take the order over.
                log.warning("cleaning up an abandoned create", extra={"binding_id": claim.binding_id})
                await self._clean_abandoned(claim.binding_id)
                cleaned = claim.binding_id
                continue
            if claim.outcome == "done":
                existing = await self._existing(claim)
                if existing is None:
                    # The order's binding is past its retention: the order id is free to serve again.
                    await self.orders.forget(spec.tenant_id, spec.out_order_id, claim.binding_id, fp)
                    continue
                set_span_attributes(binding_id=claim.binding_id, idempotency="repeat")
                return pb.CreateBindingResponse(binding=existing)
            if claim.outcome == "conflict":
                raise AlreadyExists(
                    f"order {spec.out_order_id} of tenant {spec.tenant_id} is bound to other parties",
                    resource_type="binding",
                    resource_name=claim.binding_id,
                )
            # busy: a concurrent create of the same order is running; wait for its outcome.
            if time.monotonic() > give_up:
                raise AbortedError(f"order {spec.out_order_id} is being created by another call; retry")
            await asyncio.sleep(0.005 + random.random() * 0.02)
        set_span_attributes(binding_id=binding_id, idempotency=claim.outcome)
        binding = await self._create(spec, binding_id, fp, create_ms, deadline_ms, expire_ms)
        return pb.CreateBindingResponse(binding=binding)

    async def _existing(self, claim: Claim) -> pb.Binding | None:
        """The binding a done order names, or None when its record is past retention."""
        stored = (await get_stored_bindings(self.redis, [claim.binding_id])).get(claim.binding_id)
        if stored is None:
            return None
        if stored.pending:
            # Committed records are activated before the commit; this completes one written by an older version.
            await self.records.activate(claim.binding_id, stored.record.end_ms())
        return to_proto(stored.record, city_fallback=stored.city_fallback)

    async def _create(
        self, spec: CreateSpec, binding_id: str, fp: str, create_ms: int, deadline_ms: int, expire_ms: int
    ) -> pb.Binding:
        parties = [spec.party_a, spec.party_b] if spec.party_b else [spec.party_a]
        reservation_id = ""
        record: BindingRecord | None = None
        try:
            allocation = await self.allocation.allocate(
                spec.tenant_id, spec.mode, parties, spec.city_code, spec.strict_city, self.lease_ms
            )
            reservation_id = allocation.reservation_id
            record = BindingRecord(
                binding_id=binding_id,
                tenant_id=spec.tenant_id,
                out_order_id=spec.out_order_id,
                mode=spec.mode,
                party_a=spec.party_a,
                party_b=spec.party_b,
                virtual_number=allocation.virtual_number,
                extension=allocation.extension,
                city_code=allocation.city_code,
                call_restriction=spec.call_restriction,
                recording_enabled=spec.recording_enabled,
                allow_any_caller=spec.allow_any_caller,
                user_consent=True,
                create_ms=create_ms,
                expire_ms=expire_ms,
                update_ms=create_ms,
                delete_ms=0,
            )
            created, *_ = await _all(
                (
                    self.records.create(
                        record,
                        reservation_id=reservation_id,
                        city_fallback=allocation.city_fallback,
                        keep_until_ms=deadline_ms + _PENDING_KEEP_MS,
                    ),
                    self.records.add_to_history(record.virtual_number, binding_id, expire_ms),
                    self.tenants.add(spec.tenant_id, binding_id, create_ms),
                )
            )
            if not created:
                record = None  # not ours: the undo must not touch it
                raise AbortedError(f"binding id {binding_id} exists already; retry")
            await self._put_routes(record)
            await self.allocation.confirm(reservation_id, binding_id, expire_ms)
            # The record first (committed, kept for end + retention), then the order: the commit point. A record
            # activated without a commit is undone below, or by the create that takes a stale claim over.
            await self.records.activate(binding_id, expire_ms)
            if not await self.orders.commit(
                spec.tenant_id, spec.out_order_id, binding_id, fp, deadline_ms, expire_ms + self.retention_ms
            ):
                raise AbortedError(f"order {spec.out_order_id} took longer than its lease and was taken over; retry")
        except BaseException as exc:
            log.warning(
                "create failed midway, undoing it",
                extra={"binding_id": binding_id, "error": repr(exc), "tenant_id": spec.tenant_id},
            )
            await asyncio.shield(self._undo_create(spec, binding_id, fp, deadline_ms, reservation_id, record))
            raise
        log.info(
            "binding created",
            extra={
                "binding_id": binding_id,
                "tenant_id": spec.tenant_id,
                "virtual_number": record.virtual_number,
                "party_a": mask(spec.party_a),
                "party_b": mask(spec.party_b),
            },
        )
        return to_proto(record, city_fallback=allocation.city_fallback)

    async def _put_routes(self, record: BindingRecord, replaces: tuple[str, ...] = ()) -> None:
        try:
            await self.routes.put(record.virtual_number, route_of(record), record.extension, replaces=replaces)
        except RouteConflictError as exc:
            raise AbortedError(
                f"number {record.virtual_number} is still routed for binding {exc.holder}; retry"
            ) from None

    async def _undo_create(
        self,
        spec: CreateSpec,
        binding_id: str,
        fp: str,
        deadline_ms: int,
        reservation_id: str,
        record: BindingRecord | None,
    ) -> None:
        """Best effort, every step independent: nothing of a failed create may stay reserved or written."""
        try:
            if await self.orders.committed_binding(spec.tenant_id, spec.out_order_id) == binding_id:
                return  # the commit reached Redis though its reply did not reach us: the binding exists
        except Exception as exc:
            log.warning("could not read the order key while undoing a create", extra={"error": repr(exc)})
        essential: list[Awaitable[Any]] = []
        if record is not None:
            essential.append(self.routes.remove(record.virtual_number, route_of(record), record.extension))
        if reservation_id:
            essential.append(self.allocation.cancel(reservation_id, "binding create failed"))
        tidy: list[Awaitable[Any]] = []
        if record is not None:  # (None: nothing of this binding was written, or the id was another's)
            tidy.append(self.tenants.remove(spec.tenant_id, [binding_id]))
            tidy.append(self.records.remove_from_history(record.virtual_number, binding_id))
        results = await asyncio.gather(*essential, return_exceptions=True)
        # The record goes only once routes and reservation are gone: it names the reservation, the way back to
        # it if undoing failed now. Index and history entries without a record are ignored by every reader.
        if record is not None and not any(isinstance(r, BaseException) for r in results):
            tidy.append(self.records.discard(binding_id))
        tidy.append(self.orders.release(spec.tenant_id, spec.out_order_id, binding_id, fp, deadline_ms))
        results += await asyncio.gather(*tidy, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                log.error("undoing a failed create left something behind", extra={"error": repr(result)})

    async def _clean_abandoned(self, binding_id: str) -> None:
        """Removes what a crashed or stuck create of the same order wrote (its claim is ours now)."""
        stored = (await get_stored_bindings(self.redis, [binding_id])).get(binding_id)
        if stored is None:
            return
        record = stored.record
        await _all(
            (
                self.routes.remove(record.virtual_number, route_of(record), record.extension),
                self.allocation.cancel(stored.reservation_id, "binding create abandoned"),
                self.records.remove_from_history(record.virtual_number, binding_id),
                self.tenants.remove(record.tenant_id, [binding_id]),
            )
        )
        await self.records.discard(binding_id)

    # ----- reads -----

    async def _load(self, binding_id: str, tenant_id: str) -> StoredBinding:
        """The tenant's committed binding, or NOT_FOUND (also for another tenant's binding)."""
        set_span_attributes(tenant=tenant_id, binding_id=binding_id)
        stored = (await get_stored_bindings(self.redis, [binding_id])).get(binding_id)
        if stored is None or stored.record.tenant_id != tenant_id:
            raise NotFound(f"binding {binding_id} not found", resource_type="binding", resource_name=binding_id)
        if stored.pending:
            committed = await self.orders.committed_binding(tenant_id, stored.record.out_order_id)
            if committed != binding_id:
                raise NotFound(f"binding {binding_id} not found", resource_type="binding", resource_name=binding_id)
            await self.records.activate(binding_id, stored.record.end_ms())
            stored = replace(stored, status="a")
        return stored

    async def _GetBinding(self, request: pb.GetBindingRequest, context: Any) -> pb.GetBindingResponse:
        binding_id, tenant_id = ids("", request.binding_id, request.tenant_id)
        stored = await self._load(binding_id, tenant_id)
        reply = pb.GetBindingResponse(binding=to_proto(stored.record, city_fallback=stored.city_fallback))
        if request.include_history:
            reply.history.extend(event_to_proto(event) for event in stored.history())
        return reply

    async def _ListBindings(self, request: pb.ListBindingsRequest, context: Any) -> pb.ListBindingsResponse:
        v = Violations()
        tenant_id = check_tenant("tenant_id", request.tenant_id, v)
        if request.out_order_id:
            check_order("out_order_id", request.out_order_id, v)
        if not 0 <= request.page_size <= _MAX_PAGE:
            v.add("page_size", f"must be between 1 and {_MAX_PAGE} (0: {_DEFAULT_PAGE})")
        after = ""
        if request.page_token:
            decoded = decode_page_token(request.page_token)
            if decoded is None:
                v.add("page_token", "is not a token returned by ListBindings")
            else:
                after = decoded
        v.raise_if_any()
        if request.out_order_id:
            binding_id = await self.orders.committed_binding(tenant_id, request.out_order_id)
            if binding_id is None:
                return pb.ListBindingsResponse()
            try:
                stored = await self._load(binding_id, tenant_id)
            except NotFound:
                return pb.ListBindingsResponse()
            return pb.ListBindingsResponse(bindings=[to_proto(stored.record, city_fallback=stored.city_fallback)])
        size = request.page_size or _DEFAULT_PAGE
        page_ids, more = await self.tenants.page(tenant_id, after, size)
        stored_by_id = await get_stored_bindings(self.redis, page_ids)
        now = now_ms()
        bindings = []
        for binding_id in page_ids:
            found = stored_by_id.get(binding_id)
            if found is None or found.pending or found.record.tenant_id != tenant_id:
                continue  # purged after retention, or a create in flight or undone
            bindings.append(to_proto(found.record, city_fallback=found.city_fallback, now=now))
        token = encode_page_token(page_ids[-1]) if more and page_ids else ""
        return pb.ListBindingsResponse(bindings=bindings, next_page_token=token)

    async def _TraceNumber(self, request: pb.TraceNumberRequest, context: Any) -> pb.TraceNumberResponse:
        virtual_number = virtual_field("virtual_number", request.virtual_number)
        at_ms = request.at.ToMilliseconds() if request.HasField("at") else now_ms()
        party = party_field("party_number", request.party_number) if request.party_number else ""
        extension = extension_filter(request.extension)
        found = await trace_number(self.redis, virtual_number, at_ms, party=party, extension=extension)
        if not found:
            raise NotFound(f"number {virtual_number} served no binding at that moment")
        now = now_ms()
        return pb.TraceNumberResponse(bindings=[to_proto(record, now=now) for record in found])

    # ----- update / delete -----

    async def _UpdateBinding(self, request: pb.UpdateBindingRequest, context: Any) -> pb.UpdateBindingResponse:
        spec = update_spec(request)
        await self._load(spec.binding_id, spec.tenant_id)  # NOT_FOUND for another tenant before any lock
        async with self.locks.hold(spec.binding_id):
            stored = await self._load(spec.binding_id, spec.tenant_id)
            record = stored.record
            now = now_ms()
            if record.delete_ms:
                raise FailedPrecondition(f"binding {record.binding_id} was deleted", subject=record.binding_id)
            if record.expire_ms <= now:
                raise FailedPrecondition(f"binding {record.binding_id} has expired", subject=record.binding_id)
            updated = self._apply(spec, record, now)
            binding = await self._update(stored, updated, now)
        return pb.UpdateBindingResponse(binding=binding)

    def _apply(self, spec: UpdateSpec, record: BindingRecord, now: int) -> BindingRecord:
        v = Violations()
        updated = record
        if "expire_time" in spec.paths:
            latest = record.create_ms + self.max_ttl_ms
            if spec.expire_ms <= now:
                v.add("binding.expire_time", "must be in the future (delete the binding to end it now)")
            elif spec.expire_ms > latest:
                v.add(
                    "binding.expire_time",
                    f"must be at most {self.settings.max_ttl_seconds:g}s after the binding's create_time",
                )
            updated = replace(updated, expire_ms=spec.expire_ms)
        if "party_b" in spec.paths:
            if not spec.party_b and record.mode != MODE_AXN:
                v.add("binding.party_b", "is required")
            elif spec.party_b == record.party_a:
                v.add("binding.party_b", "must differ from party_a")
            updated = replace(updated, party_b=spec.party_b)
        if "call_restriction" in spec.paths:
            updated = replace(updated, call_restriction=spec.call_restriction)
        if "recording_enabled" in spec.paths:
            updated = replace(updated, recording_enabled=spec.recording_enabled)
        v.raise_if_any()
        return replace(updated, update_ms=now)

    async def _update(self, stored: StoredBinding, new: BindingRecord, now: int) -> pb.Binding:
        old = stored.record
        reservation_id = stored.reservation_id
        changes: dict[str, str] = {}
        fields: dict[str, str] = {"ums": str(now)}
        party_changed = new.party_b != old.party_b
        if party_changed:
            changes["b"] = fields["b"] = new.party_b
        if new.expire_ms != old.expire_ms:
            changes["exp"] = fields["ems"] = str(new.expire_ms)
        if new.call_restriction != old.call_restriction:
            changes["r"] = fields["r"] = str(new.call_restriction)
        if new.recording_enabled != old.recording_enabled:
            changes["rec"] = fields["rec"] = "1" if new.recording_enabled else "0"
        replaced = False
        # Widening steps first (harmless if a later step fails), the record, the routes, narrowing steps last.
        if party_changed and old.mode != MODE_AXN:
            # AXB/AXE: allocation keeps each real number once per X; it refuses a B already on this number.
            reservation_id = await self.allocation.replace_party(reservation_id, old.party_b, new.party_b)
            fields["rid"] = reservation_id
            replaced = True
        extended = new.expire_ms > old.expire_ms
        if extended:
            await self.allocation.confirm(reservation_id, old.binding_id, new.expire_ms)
            await _all(
                (
                    self.records.add_to_history(old.virtual_number, old.binding_id, new.expire_ms),
                    # The order key lives as long as the record, so the order stays idempotent that long.
                    self.orders.extend(old.tenant_id, old.out_order_id, new.expire_ms + self.retention_ms),
                )
            )
        try:
            event = BindingEvent("update", now, changes) if changes else None
            end_ms = new.expire_ms if "exp" in changes else None
            await self.records.update(old.binding_id, fields, event, end_ms=end_ms)
        except BaseException:
            if replaced:
                await asyncio.shield(self._replace_back(reservation_id, new.party_b, old.party_b))
            raise
        replaces = (caller_key(old.virtual_number, old.party_b),) if party_changed and old.mode == MODE_AXB else ()
        await self._put_routes(new, replaces)
        if new.expire_ms < old.expire_ms:
            await self.allocation.confirm(reservation_id, old.binding_id, new.expire_ms)
        log.info(
            "binding updated",
            extra={"binding_id": old.binding_id, "changed": sorted(changes), "party_b": mask(new.party_b)},
        )
        return to_proto(new, city_fallback=stored.city_fallback, now=now)

    async def _replace_back(self, reservation_id: str, new_party: str, old_party: str) -> None:
        try:
            await self.allocation.replace_party(reservation_id, new_party, old_party)
        except DomainError as exc:
            log.error("could not undo ReplaceParty", extra={"error": exc.message})

    async def _DeleteBinding(self, request: pb.DeleteBindingRequest, context: Any) -> pb.DeleteBindingResponse:
        binding_id, tenant_id = ids("", request.binding_id, request.tenant_id)
        await self._load(binding_id, tenant_id)  # NOT_FOUND for another tenant before any lock
        async with self.locks.hold(binding_id):
            stored = await self._load(binding_id, tenant_id)
            record = stored.record
            now = now_ms()
            route = route_of(record)
            if not record.delete_ms and record.expire_ms <= now:
                # Expired already: nothing routes or holds the number any more; it stays EXPIRED.
                return pb.DeleteBindingResponse(binding=to_proto(record, city_fallback=stored.city_fallback, now=now))
            if not record.delete_ms:
                # Calls stop first, then the record says so, then the number is given back.
                await self.routes.remove(record.virtual_number, route, record.extension)
                await self.records.update(
                    binding_id, {"dms": str(now), "ums": str(now)}, BindingEvent("delete", now, {}), end_ms=now
                )
                record = replace(record, delete_ms=now, update_ms=now)
                log.info("binding deleted", extra={"binding_id": binding_id, "tenant_id": tenant_id})
            else:
                # A repeated delete finishes whatever a failed one may have left.
                await self.routes.remove(record.virtual_number, route, record.extension)
            await self.allocation.cancel(stored.reservation_id, "binding deleted")
        return pb.DeleteBindingResponse(binding=to_proto(record, city_fallback=stored.city_fallback, now=now))
