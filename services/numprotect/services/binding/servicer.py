"""The BindingService servicer: validates requests, calls the domain modules, converts to protobuf.

Creates run in create.py (the saga), updates and deletes in update.py, reads in reads.py; every RPC first waits for a
place in one ConcurrencyLimit (sized in app.py).

Who may call what is the policy table's (numprotect.core.identity.policy), checked once in the call layer; here each
call acts for one tenant (`Callers.tenant`: a tenant principal's own, which an empty tenant_id means; the operator
names one), so another tenant's binding id answers NOT_FOUND exactly like a missing one, a tenant's TraceNumber
shows only its own bindings, and a page token continues one tenant's listing. CreateBinding and TraceNumber are
rate limited per principal (`RateLimits`).
"""

# ruff: noqa: N802  (RPC method names come from the proto)

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from numprotect.binding.v1 import binding_pb2 as pb
from numprotect.binding.v1 import binding_pb2_grpc
from numprotect.core.binding_protos import binding_to_proto, event_to_proto
from numprotect.core.clock import Clock
from numprotect.core.conversions import optional_timestamp_ms
from numprotect.core.errors import InvalidArgument
from numprotect.core.identifiers import OUT_ORDER_ID, TENANT_ID
from numprotect.core.identity.layer import Callers
from numprotect.core.identity.principal import Principal
from numprotect.core.limits import ConcurrencyLimit, RateLimit
from numprotect.core.page_tokens import PageTokenKey, PageTokens
from numprotect.core.phone import party_field, virtual_field
from numprotect.services.binding.concurrency import limit_methods
from numprotect.services.binding.create import BindingCreator
from numprotect.services.binding.deadline import CallBudget
from numprotect.services.binding.reads import BindingReads
from numprotect.services.binding.settings import BindingSettings
from numprotect.services.binding.update import BindingUpdater
from numprotect.services.binding.validation import Violations, create_spec, extension_filter, ids, update_spec

SERVICE = pb.DESCRIPTOR.services_by_name["BindingService"]
_DEFAULT_PAGE = 100
_MAX_PAGE = 1000


@dataclass(frozen=True)
class RateLimits:
    """Per-principal token buckets of the rate-limited RPCs, in this replica's memory (no Redis round trip)."""

    create: RateLimit
    trace: RateLimit

    @classmethod
    def from_settings(cls, settings: BindingSettings) -> RateLimits:
        return cls(
            create=RateLimit(settings.create_rate, settings.create_burst, name="NUMPROTECT_CREATE_BINDING_RATE"),
            trace=RateLimit(settings.trace_rate, settings.trace_burst, name="NUMPROTECT_TRACE_NUMBER_RATE"),
        )


def rate_key(principal: Principal) -> str:
    """Whose bucket a call takes from: the tenant (or carrier, service) whatever key it uses, so that adding keys
    does not add allowance; a principal without an id (an operator or regulator key) per key."""
    return f"{principal.role.value}:{principal.id}" if principal.id else principal.subject


class BindingServiceServicer(binding_pb2_grpc.BindingServiceServicer):
    def __init__(
        self,
        creator: BindingCreator,
        updater: BindingUpdater,
        reads: BindingReads,
        settings: BindingSettings,
        clock: Clock,
        calls: ConcurrencyLimit,
        page_token_key: PageTokenKey,
        callers: Callers,
        rate_limits: RateLimits,
    ) -> None:
        self.creator = creator
        self.callers = callers
        self.rate_limits = rate_limits
        self.updater = updater
        self.reads = reads
        self.settings = settings
        self.clock = clock
        # A token continues the listing of one tenant (signed, bound to the tenant id).
        self.list_tokens = PageTokens(page_token_key, "binding.ListBindings")
        limit_methods(self, SERVICE.methods_by_name, calls)

    def _tenant(self, requested: str, field: str = "tenant_id") -> str:
        """The tenant the call acts for; "" when the caller must name one and did not (the request's validation
        reports it with every other violation). Another tenant than a tenant principal's own: PERMISSION_DENIED."""
        try:
            return self.callers.tenant(requested, field=field)
        except InvalidArgument:
            return ""

    def _budget(self, context: Any) -> CallBudget:
        """How long the call may work: its deadline less the answer's margin (without one, the create lease)."""
        return CallBudget.of_call(context, self.settings.create_lease_seconds)

    async def CreateBinding(self, request: pb.CreateBindingRequest, context: Any) -> pb.CreateBindingResponse:
        self.rate_limits.create.take(rate_key(self.callers.principal()))
        spec = create_spec(
            request,
            tenant_id=self._tenant(request.tenant_id),
            min_ttl_ms=self.settings.min_ttl_ms,
            max_ttl_ms=self.settings.max_ttl_ms,
            default_ttl_ms=self.settings.default_ttl_ms,
        )
        created = await self.creator.create(spec, self._budget(context))
        binding = binding_to_proto(created.record, city_fallback=created.city_fallback, now_ms=self.clock.now_ms())
        return pb.CreateBindingResponse(binding=binding)

    async def GetBinding(self, request: pb.GetBindingRequest, context: Any) -> pb.GetBindingResponse:
        binding_id, tenant_id = ids("", request.binding_id, self._tenant(request.tenant_id))
        budget = self._budget(context)
        async with budget.bound("GetBinding"):
            stored = await self.reads.load(binding_id, tenant_id, budget=budget)
        now = self.clock.now_ms()
        reply = pb.GetBindingResponse(
            binding=binding_to_proto(stored.record, city_fallback=stored.city_fallback, now_ms=now)
        )
        if request.include_history:
            reply.history.extend(event_to_proto(event) for event in stored.history(now))
        return reply

    async def UpdateBinding(self, request: pb.UpdateBindingRequest, context: Any) -> pb.UpdateBindingResponse:
        tenant_id = self._tenant(request.binding.tenant_id, "binding.tenant_id")
        stored = await self.updater.update(update_spec(request, tenant_id=tenant_id), self._budget(context))
        binding = binding_to_proto(stored.record, city_fallback=stored.city_fallback, now_ms=self.clock.now_ms())
        return pb.UpdateBindingResponse(binding=binding)

    async def DeleteBinding(self, request: pb.DeleteBindingRequest, context: Any) -> pb.DeleteBindingResponse:
        binding_id, tenant_id = ids("", request.binding_id, self._tenant(request.tenant_id))
        stored = await self.updater.delete(binding_id, tenant_id, self._budget(context))
        binding = binding_to_proto(stored.record, city_fallback=stored.city_fallback, now_ms=self.clock.now_ms())
        return pb.DeleteBindingResponse(binding=binding)

    async def ListBindings(self, request: pb.ListBindingsRequest, context: Any) -> pb.ListBindingsResponse:
        v = Violations()
        tenant_id = v.identifier(TENANT_ID, "tenant_id", self._tenant(request.tenant_id))
        if request.out_order_id:
            v.identifier(OUT_ORDER_ID, "out_order_id", request.out_order_id)
        if not 0 <= request.page_size <= _MAX_PAGE:
            v.add("page_size", f"must be between 1 and {_MAX_PAGE} (0: {_DEFAULT_PAGE})")
        after = ""
        if request.page_token:
            try:
                [after] = self.list_tokens.decode(request.page_token, query=[tenant_id], fields=1)
            except InvalidArgument as exc:
                v.items.extend(exc.violations)
        v.raise_if_any()
        if request.out_order_id:
            found = await self.reads.by_order(tenant_id, request.out_order_id)
            page, next_after = ([] if found is None else [found]), ""
        else:
            page, next_after = await self.reads.page(tenant_id, after, request.page_size or _DEFAULT_PAGE)
        now = self.clock.now_ms()
        return pb.ListBindingsResponse(
            bindings=[binding_to_proto(s.record, city_fallback=s.city_fallback, now_ms=now) for s in page],
            next_page_token=self.list_tokens.encode([next_after], query=[tenant_id]) if next_after else "",
        )

    async def TraceNumber(self, request: pb.TraceNumberRequest, context: Any) -> pb.TraceNumberResponse:
        # The regulator's mandatory reason is the call layer's (policy: reason_required); it audits the call too.
        self.rate_limits.trace.take(rate_key(self.callers.principal()))
        virtual_number = virtual_field("virtual_number", request.virtual_number)
        at_ms = optional_timestamp_ms(request, "at")
        party = party_field("party_number", request.party_number) if request.party_number else ""
        extension = extension_filter(request.extension)
        now = self.clock.now_ms()
        found = await self.reads.trace(
            virtual_number,
            now if at_ms is None else at_ms,
            party=party,
            extension=extension,
            visible=self.callers.may_see_tenant,
        )
        return pb.TraceNumberResponse(bindings=[binding_to_proto(record, now_ms=now) for record in found])
