"""The one policy table: method → roles allowed → scoping rule → audit. Fail closed: a method without an entry
is denied to everyone (tests walk every method of every service descriptor and check it has one).

Scoping rules (the servicer applies them through `layer.Callers`, the layer checks what it can alone):
- TENANT_FIELD: the request's `tenant_id` names the tenant; a tenant principal may only name itself (empty means
  itself), other roles must name one. Records found by id that belong to another tenant answer NOT_FOUND.
- CARRIER_NUMBERS: a carrier principal only for numbers of blocks it routes (`Directory.carrier_of`).
- OWN_EVENTS: a regulator sees only its own audit events.
- NONE: the role alone decides.

Audit: ALWAYS (privileged: every call leaves an event), BY_ROLES (only when an operator or regulator calls:
their reads of tenant data), NEVER. Every denied call leaves an event whatever the entry says.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from numprotect.core.identity.principal import Role


class Scope(enum.Enum):
    NONE = "none"
    TENANT_FIELD = "tenant_id field"
    CARRIER_NUMBERS = "carrier's own blocks"
    OWN_EVENTS = "own audit events"


class Audit(enum.Enum):
    NEVER = "never"
    BY_ROLES = "operator and regulator calls"
    ALWAYS = "always"


_OVERSEERS = frozenset({Role.OPERATOR, Role.REGULATOR})


@dataclass(frozen=True)
class MethodPolicy:
    roles: frozenset[Role]
    scope: Scope = Scope.NONE
    audit: Audit = Audit.NEVER
    services: frozenset[str] = frozenset()  # for Role.SERVICE: which services may call
    reason_required: frozenset[Role] = frozenset()  # roles that must give `reason` (a case reference)
    # Request fields that name what the call acts on, recorded as the audit event's target (ids and 700
    # numbers only: a real party number is never recorded); "a.b" is field b of message field a.
    target_fields: tuple[str, ...] = ()
    # Scope.TENANT_FIELD: the request field that names the tenant ("endpoint.tenant_id": inside a message field).
    tenant_field: str = "tenant_id"

    def allows(self, role: Role, service_name: str) -> bool:
        if role not in self.roles:
            return False
        return role is not Role.SERVICE or service_name in self.services

    def audited_for(self, role: Role) -> bool:
        return self.audit is Audit.ALWAYS or (self.audit is Audit.BY_ROLES and role in _OVERSEERS)


def _p(*roles: Role, **kwargs: object) -> MethodPolicy:
    return MethodPolicy(frozenset(roles), **kwargs)  # type: ignore[arg-type]


OPERATOR, TENANT, CARRIER, REGULATOR, SERVICE = Role.OPERATOR, Role.TENANT, Role.CARRIER, Role.REGULATOR, Role.SERVICE
_BINDING_ONLY = frozenset({"binding"})
_ANY_SERVICE = frozenset({"allocation", "binding", "translation", "cdr", "events", "sip"})
_ALLOC = "/numprotect.allocation.v1.AllocationService/"
_BIND = "/numprotect.binding.v1.BindingService/"
_TRANS = "/numprotect.translation.v1.TranslationService/"
_CDR = "/numprotect.cdr.v1.CdrService/"
_ADMIN = "/numprotect.admin.v1.AdminService/"
_EVENTS = "/numprotect.events.v1.EventService/"
_NUMBER = ("tenant_id", "virtual_number")
_ENDPOINT = ("tenant_id", "endpoint_id")


def _events(*, target_fields: tuple[str, ...] = _ENDPOINT, tenant_field: str = "tenant_id") -> MethodPolicy:
    """An EventService method: a tenant's own endpoints and events; the operator any tenant's (audited)."""
    return _p(
        TENANT,
        OPERATOR,
        scope=Scope.TENANT_FIELD,
        audit=Audit.BY_ROLES,
        target_fields=target_fields,
        tenant_field=tenant_field,
    )


POLICY: Mapping[str, MethodPolicy] = MappingProxyType(
    {
        # Allocation: the operator runs pools and locks; only binding reserves; tenants read their own.
        _ALLOC + "ImportBlock": _p(OPERATOR, audit=Audit.ALWAYS, target_fields=("block", "tenant_id", "carrier_id")),
        _ALLOC + "AllocateNumber": _p(SERVICE, services=_BINDING_ONLY, scope=Scope.TENANT_FIELD),
        _ALLOC + "ConfirmReservation": _p(SERVICE, services=_BINDING_ONLY),
        _ALLOC + "CancelReservation": _p(SERVICE, services=_BINDING_ONLY),
        _ALLOC + "ReplaceParty": _p(SERVICE, services=_BINDING_ONLY),
        # Their batch forms: the same callers (each item's tenant_id is scoped as AllocateNumber's).
        _ALLOC + "AllocateNumbers": _p(SERVICE, services=_BINDING_ONLY, scope=Scope.TENANT_FIELD),
        _ALLOC + "ConfirmReservations": _p(SERVICE, services=_BINDING_ONLY),
        _ALLOC + "CancelReservations": _p(SERVICE, services=_BINDING_ONLY),
        _ALLOC + "ReleaseNumber": _p(OPERATOR, audit=Audit.ALWAYS, target_fields=_NUMBER),
        _ALLOC + "LockNumber": _p(OPERATOR, audit=Audit.ALWAYS, target_fields=_NUMBER),
        _ALLOC + "UnlockNumber": _p(OPERATOR, audit=Audit.ALWAYS, target_fields=_NUMBER),
        _ALLOC + "GetNumber": _p(
            OPERATOR, TENANT, REGULATOR, scope=Scope.TENANT_FIELD, audit=Audit.BY_ROLES, target_fields=_NUMBER
        ),
        _ALLOC + "GetPoolStats": _p(
            OPERATOR, TENANT, scope=Scope.TENANT_FIELD, audit=Audit.BY_ROLES, target_fields=("tenant_id", "city_code")
        ),
        _ALLOC + "ListNumberHistory": _p(
            OPERATOR,
            TENANT,
            REGULATOR,
            scope=Scope.TENANT_FIELD,
            audit=Audit.BY_ROLES,
            reason_required=frozenset({REGULATOR}),
            target_fields=_NUMBER,
        ),
        # Binding: tenants write their own; the operator reads any tenant's (audited).
        _BIND + "CreateBinding": _p(TENANT, scope=Scope.TENANT_FIELD),
        _BIND + "GetBinding": _p(
            TENANT, OPERATOR, scope=Scope.TENANT_FIELD, audit=Audit.BY_ROLES, target_fields=("binding_id",)
        ),
        _BIND + "UpdateBinding": _p(TENANT, scope=Scope.TENANT_FIELD),
        _BIND + "DeleteBinding": _p(TENANT, scope=Scope.TENANT_FIELD),
        _BIND + "ListBindings": _p(
            TENANT, OPERATOR, scope=Scope.TENANT_FIELD, audit=Audit.BY_ROLES, target_fields=("tenant_id",)
        ),
        _BIND + "TraceNumber": _p(
            REGULATOR,
            OPERATOR,
            TENANT,
            scope=Scope.TENANT_FIELD,
            audit=Audit.BY_ROLES,
            reason_required=frozenset({REGULATOR}),
            target_fields=("virtual_number",),
        ),
        # Translation: carriers translate their own numbers; blocklists belong to a tenant or (global) the operator.
        _TRANS + "Translate": _p(CARRIER, scope=Scope.CARRIER_NUMBERS),
        _TRANS + "TranslateStream": _p(CARRIER, scope=Scope.CARRIER_NUMBERS),
        _TRANS + "BlockCaller": _p(
            TENANT, OPERATOR, scope=Scope.TENANT_FIELD, audit=Audit.BY_ROLES, target_fields=("tenant_id",)
        ),
        _TRANS + "UnblockCaller": _p(
            TENANT, OPERATOR, scope=Scope.TENANT_FIELD, audit=Audit.BY_ROLES, target_fields=("tenant_id",)
        ),
        _TRANS + "ListBlockedCallers": _p(
            TENANT, OPERATOR, scope=Scope.TENANT_FIELD, audit=Audit.BY_ROLES, target_fields=("tenant_id",)
        ),
        # CDRs: carriers report calls on their own numbers; tenants read their own; the operator any (audited).
        _CDR + "IngestCdrs": _p(CARRIER, scope=Scope.CARRIER_NUMBERS),
        _CDR + "StreamCdrs": _p(CARRIER, scope=Scope.CARRIER_NUMBERS),
        _CDR + "ListCdrs": _p(
            TENANT, OPERATOR, scope=Scope.TENANT_FIELD, audit=Audit.BY_ROLES, target_fields=("tenant_id",)
        ),
        _CDR + "WatchCdrs": _p(
            TENANT, OPERATOR, scope=Scope.TENANT_FIELD, audit=Audit.BY_ROLES, target_fields=("tenant_id",)
        ),
        _CDR + "GetCdrStats": _p(
            TENANT, OPERATOR, scope=Scope.TENANT_FIELD, audit=Audit.BY_ROLES, target_fields=("tenant_id",)
        ),
        _CDR + "GetAbuseSignals": _p(
            TENANT, OPERATOR, scope=Scope.TENANT_FIELD, audit=Audit.BY_ROLES, target_fields=("tenant_id",)
        ),
        # Events: a tenant's webhook endpoints, deliveries and events are its own; the operator's calls are audited.
        _EVENTS + "CreateEndpoint": _events(target_fields=("tenant_id",)),
        _EVENTS + "GetEndpoint": _events(),
        _EVENTS + "ListEndpoints": _events(target_fields=("tenant_id",)),
        _EVENTS + "UpdateEndpoint": _events(
            target_fields=("endpoint.tenant_id", "endpoint.endpoint_id"), tenant_field="endpoint.tenant_id"
        ),
        _EVENTS + "RotateEndpointSecret": _events(),
        _EVENTS + "DeleteEndpoint": _events(),
        _EVENTS + "ListDeliveries": _events(),
        _EVENTS + "ReplayEvents": _events(),
        _EVENTS + "ListDeadLetters": _events(),
        _EVENTS + "RedriveDeadLetters": _events(),
        _EVENTS + "WatchEvents": _events(target_fields=("tenant_id",)),
        # Admin (served by the allocation process): the operator's; a regulator lists its own audit events.
        _ADMIN + "CreateApiKey": _p(
            OPERATOR, audit=Audit.ALWAYS, target_fields=("role", "tenant_id", "carrier_id", "service")
        ),
        _ADMIN + "RevokeApiKey": _p(OPERATOR, audit=Audit.ALWAYS, target_fields=("key_id",)),
        _ADMIN + "ListApiKeys": _p(OPERATOR),
        _ADMIN + "ListAuditEvents": _p(OPERATOR, REGULATOR, scope=Scope.OWN_EVENTS),
        _ADMIN + "VerifyAuditChain": _p(OPERATOR, audit=Audit.ALWAYS),
        # Reflection: any authenticated principal (grpcurl sends its -H headers on reflection too).
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": _p(*Role, services=_ANY_SERVICE),
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": _p(*Role, services=_ANY_SERVICE),
    }
)
