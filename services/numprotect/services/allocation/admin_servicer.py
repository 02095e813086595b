"""The AdminService servicer: validates requests, calls admin.ApiKeys / admin.AuditTrail, converts to protobuf.

The call layer has already checked the role (operator; a regulator for ListAuditEvents) and writes the audit
events. A token appears only in CreateApiKey's response: never in a log, span or error.
"""

# ruff: noqa: N802  (RPC method names come from the proto)

from __future__ import annotations

import re
import unicodedata
from typing import Any

from numprotect.admin.v1 import admin_pb2 as pb
from numprotect.admin.v1 import admin_pb2_grpc
from numprotect.core.clock import Clock
from numprotect.core.conversions import optional_timestamp_ms, timestamp_from_ms
from numprotect.core.errors import FieldViolation, InvalidArgument
from numprotect.core.identifiers import CARRIER_ID, TENANT_ID
from numprotect.core.identity.api_keys import ApiKeyRecord
from numprotect.core.identity.audit import AuditEvent
from numprotect.core.identity.layer import Callers
from numprotect.core.identity.principal import Role
from numprotect.core.page_tokens import PageTokenKey, PageTokens
from numprotect.core.settings import SERVICE_NAMES  # the services a Role.SERVICE key may name
from numprotect.services.allocation.admin import ApiKeys, AuditTrail, EventFilter, KeyFilter, principal_base

DESCRIPTION_LIMIT = 256
_MAX_PAGE = 1000
_DEFAULT_PAGE = 100
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_ROLES = {
    pb.ROLE_OPERATOR: Role.OPERATOR,
    pb.ROLE_TENANT: Role.TENANT,
    pb.ROLE_CARRIER: Role.CARRIER,
    pb.ROLE_REGULATOR: Role.REGULATOR,
    pb.ROLE_SERVICE: Role.SERVICE,
}
_ROLE_ENUMS = {role: value for value, role in _ROLES.items()}
# The request field that carries the principal's id, per role (operator and regulator keys carry none).
_ID_FIELDS = {Role.TENANT: "tenant_id", Role.CARRIER: "carrier_id", Role.SERVICE: "service"}


def _page_size(raw: int) -> int:
    if not 0 <= raw <= _MAX_PAGE:
        raise InvalidArgument.field("page_size", f"must be between 0 and {_MAX_PAGE} (0: {_DEFAULT_PAGE})")
    return raw or _DEFAULT_PAGE


def _principal_id(request: pb.CreateApiKeyRequest, role: Role) -> str:
    """The id the role needs, from the one field that carries it; every other id field must be empty."""
    violations: list[FieldViolation] = []
    needed = _ID_FIELDS.get(role)
    for field in ("tenant_id", "carrier_id", "service"):
        if field != needed and getattr(request, field):
            violations.append(FieldViolation(field, f"must be empty for {pb.Role.Name(_ROLE_ENUMS[role])}"))
    problem: FieldViolation | None = None
    if role is Role.TENANT:
        problem = TENANT_ID.violation("tenant_id", request.tenant_id)
    elif role is Role.CARRIER:
        problem = CARRIER_ID.violation("carrier_id", request.carrier_id)
    elif role is Role.SERVICE and request.service not in SERVICE_NAMES:
        problem = FieldViolation("service", f"must be one of {', '.join(SERVICE_NAMES)}")
    if problem is not None:
        violations.append(problem)
    if violations:
        raise InvalidArgument(violations)
    return str(getattr(request, needed)) if needed else ""


def api_key_message(record: ApiKeyRecord) -> pb.ApiKey:
    """A key as the API shows it: never the token, never its hash."""
    principal = record.principal
    message = pb.ApiKey(
        key_id=record.key_id,
        role=_ROLE_ENUMS[principal.role],
        tenant_id=principal.tenant_id,
        carrier_id=principal.carrier_id,
        service=principal.id if principal.role is Role.SERVICE else "",
        description=record.description,
        created_by=record.created_by,
        create_time=timestamp_from_ms(record.create_ms),
    )
    if record.expire_ms:
        message.expire_time.CopyFrom(timestamp_from_ms(record.expire_ms))
    if record.revoke_ms:
        message.revoke_time.CopyFrom(timestamp_from_ms(record.revoke_ms))
    return message


def audit_event_message(event_id: str, event: AuditEvent) -> pb.AuditEvent:
    try:
        role = _ROLE_ENUMS[Role(event.role)]
    except ValueError:  # "anonymous": no role
        role = pb.ROLE_UNSPECIFIED
    return pb.AuditEvent(
        event_id=event_id,
        time=timestamp_from_ms(event.time_ms),
        principal=event.principal,
        role=role,
        method=event.method,
        target=event.target,
        reason=event.reason,
        outcome=event.outcome,
        trace_id=event.trace_id,
        peer=event.peer,
        dropped_before=event.dropped_before,
    )


class AdminServiceServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(
        self, keys: ApiKeys, trail: AuditTrail, callers: Callers, clock: Clock, page_token_key: PageTokenKey
    ) -> None:
        self.keys = keys
        self.trail = trail
        self.callers = callers
        self.clock = clock
        self.key_tokens = PageTokens(page_token_key, "admin.ListApiKeys")
        self.event_tokens = PageTokens(page_token_key, "admin.ListAuditEvents")

    async def CreateApiKey(self, request: pb.CreateApiKeyRequest, context: Any) -> pb.CreateApiKeyResponse:
        role = _ROLES.get(request.role)
        if role is None:
            raise InvalidArgument.field("role", f"must be one of {', '.join(pb.Role.Name(v) for v in _ROLES)}")
        principal_id = _principal_id(request, role)
        if len(request.description) > DESCRIPTION_LIMIT:
            raise InvalidArgument.field("description", f"must be at most {DESCRIPTION_LIMIT} characters")
        if any(unicodedata.category(c) == "Cc" for c in request.description):
            # `numprotect keys list` prints it in a terminal table: no escape sequences, NULs or line breaks.
            raise InvalidArgument.field(
                "description", "must not contain control characters (such as terminal escapes, tabs or line breaks)"
            )
        expire_ms = optional_timestamp_ms(request, "expire_time")
        if expire_ms is not None and expire_ms <= self.clock.now_ms():
            raise InvalidArgument.field("expire_time", "must be in the future (or unset: the key never expires)")
        record, token = await self.keys.create(
            role,
            principal_id,
            description=request.description,
            expire_ms=expire_ms or 0,
            created_by=self.callers.principal().subject,
        )
        return pb.CreateApiKeyResponse(key=api_key_message(record), token=token)

    async def RevokeApiKey(self, request: pb.RevokeApiKeyRequest, context: Any) -> pb.RevokeApiKeyResponse:
        if not _KEY_ID.fullmatch(request.key_id):
            raise InvalidArgument.field("key_id", "must be the 16 hex digits of a key id (ApiKey.key_id)")
        return pb.RevokeApiKeyResponse(key=api_key_message(await self.keys.revoke(request.key_id)))

    async def ListApiKeys(self, request: pb.ListApiKeysRequest, context: Any) -> pb.ListApiKeysResponse:
        page_size = _page_size(request.page_size)
        role: Role | None = None
        if request.role != pb.ROLE_UNSPECIFIED:
            role = _ROLES.get(request.role)
            if role is None:
                raise InvalidArgument.field("role", "must be a Role value or ROLE_UNSPECIFIED (any role)")
        TENANT_ID.check("tenant_id", request.tenant_id, required=False)
        CARRIER_ID.check("carrier_id", request.carrier_id, required=False)
        key_filter = KeyFilter(role, request.tenant_id, request.carrier_id, request.show_revoked)
        query = [str(request.role), request.tenant_id, request.carrier_id, str(request.show_revoked)]
        after: tuple[int, str] | None = None
        if request.page_token:
            create_ms, key_id = self.key_tokens.decode(request.page_token, query=query, fields=2)
            after = (int(create_ms), key_id)
        records, following = await self.keys.list(key_filter, page_size, after)
        token = ""
        if following is not None:
            token = self.key_tokens.encode([str(following[0]), following[1]], query=query)
        return pb.ListApiKeysResponse(keys=[api_key_message(r) for r in records], next_page_token=token)

    async def ListAuditEvents(self, request: pb.ListAuditEventsRequest, context: Any) -> pb.ListAuditEventsResponse:
        page_size = _page_size(request.page_size)
        principal = request.principal
        caller = self.callers.principal()
        if caller.role is Role.REGULATOR:  # Scope.OWN_EVENTS: a regulator lists only its own events
            own = principal_base(caller.subject)
            if principal and principal_base(principal) != own:
                raise self.callers.refuse("principal: a regulator lists only its own audit events", "OWN_EVENTS")
            principal = principal or own
        if len(principal) > 256 or len(request.method) > 256:
            field = "principal" if len(principal) > 256 else "method"
            raise InvalidArgument.field(field, "must be at most 256 characters")
        start_ms = optional_timestamp_ms(request, "start_time")
        end_ms = optional_timestamp_ms(request, "end_time")
        for field, ms in (("start_time", start_ms), ("end_time", end_ms)):
            # Events are ordered by stream ids, which are Unix milliseconds: Redis refuses a negative one (INTERNAL).
            if ms is not None and ms < 0:
                raise InvalidArgument.field(field, "must be at or after 1970-01-01T00:00:00Z")
        if start_ms is not None and end_ms is not None and end_ms <= start_ms:
            raise InvalidArgument.field("end_time", "must be after start_time")
        event_filter = EventFilter(principal, request.method, start_ms, end_ms)
        query = [principal, request.method, str(start_ms), str(end_ms)]
        before = None
        if request.page_token:
            before = self.event_tokens.decode(request.page_token, query=query, fields=1)[0]
        events, following = await self.trail.events(event_filter, page_size, before)
        token = self.event_tokens.encode([following], query=query) if following is not None else ""
        return pb.ListAuditEventsResponse(events=[audit_event_message(i, e) for i, e in events], next_page_token=token)

    async def VerifyAuditChain(self, request: pb.VerifyAuditChainRequest, context: Any) -> pb.VerifyAuditChainResponse:
        report = await self.trail.verify()
        return pb.VerifyAuditChainResponse(
            ok=report.ok,
            events_checked=report.events,
            first_bad_event_id=report.first_bad_id,
            problem=report.problem,
            head=report.head,
        )
