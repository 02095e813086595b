"""Identity in the one call layer: every call but health is authenticated and authorized here, once.

`IdentityConcern` is a `CallConcern` (numprotect.core.calls): for each method it binds the policy entry
(none: denied to all, fail closed); per call it finds the principal (a bearer API key, else the client
certificate's SPIFFE id in mTLS mode), checks the role and what the layer can check of the scope alone, makes the
principal current for the servicer (`Callers`), and writes the audit event. On streams it re-checks the
principal on every message and, on grpc.aio, at least every second while idle: a revoked key ends the stream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import Any

import grpc
from opentelemetry import trace

from numprotect.core.calls import Method
from numprotect.core.clock import Clock, SystemClock
from numprotect.core.errors import DomainError, InvalidArgument, PermissionDenied, Unauthenticated
from numprotect.core.identity.audit import AuditEvent, AuditLog
from numprotect.core.identity.directory import Directory
from numprotect.core.identity.policy import POLICY, MethodPolicy, Scope
from numprotect.core.identity.principal import Principal, Role, principal_from_spiffe_id
from numprotect.core.metrics import Metrics

log = logging.getLogger(__name__)

# One message for a missing, malformed, unknown, wrong, expired or revoked credential: no oracle.
UNAUTHENTICATED_MESSAGE = "a valid API key (authorization: Bearer <token>) or client certificate is required"
# The principal when NUMPROTECT_AUTH=off (benchmark baselines only): every scope check passes.
UNCHECKED = Principal(Role.OPERATOR, "auth-off")

PeerIdentity = Callable[[Any], "str | None"]

# numprotect_auth_denials{reason}: every UNAUTHENTICATED and PERMISSION_DENIED this layer (or a servicer through
# `Callers`) answers. Unauthenticated kinds: no credential presented; an authorization header that is not a valid,
# active key (malformed, unknown, wrong, expired or revoked: the directory tells nobody which, by design); a client
# certificate whose SPIFFE id names no principal; a key that ended while its stream was open; a servicer reached
# without a principal (a bug). The rest: the PermissionDenied reasons, lower-cased.
UNAUTHENTICATED_REASONS = (
    "missing_credentials",
    "invalid_token",
    "invalid_certificate",
    "key_ended_during_stream",
    "no_principal",
)
PERMISSION_DENIED_REASONS = (
    "no_policy",
    "role_not_allowed",
    "other_tenant",
    "other_carrier",
    "operator_only",
    "own_events",
)


class AuthDenials:
    """The denial counter's children, made once (every reason pre-initialised at 0, so a fresh process shows them)."""

    def __init__(self, metrics: Metrics) -> None:
        counter = metrics.counter(
            "numprotect_auth_denials",
            "Calls refused UNAUTHENTICATED or PERMISSION_DENIED by the identity layer, by reason",
            ("reason",),
        )
        self._children = {r: counter.labels(r) for r in (*UNAUTHENTICATED_REASONS, *PERMISSION_DENIED_REASONS)}
        self._counter = counter

    def count(self, reason: str) -> None:
        child = self._children.get(reason)
        if child is None:  # a reason added without a name here: still counted, under its own (bounded) name
            child = self._children[reason] = self._counter.labels(reason)
        child.inc()


def refuse_other_tenant(principal: Principal, requested: str, field: str) -> None:
    """A tenant principal may name only itself (an empty field means itself)."""
    if requested and requested != principal.id:
        raise PermissionDenied(f"{field}: a tenant key acts only for its own tenant", reason="OTHER_TENANT")


class Callers:
    """What servicers ask about the current call's caller (made current by `IdentityConcern`)."""

    def __init__(self, directory: Directory | None, denials: AuthDenials | None = None) -> None:
        self._current: ContextVar[Principal | None] = ContextVar("numprotect_principal", default=None)
        self._directory = directory
        self.enabled = directory is not None
        self.denials = denials or AuthDenials(Metrics("identity", enabled=False))

    def principal(self) -> Principal:
        principal = self._current.get()
        if principal is None:
            if not self.enabled:
                return UNCHECKED
            self.denials.count("no_principal")
            raise Unauthenticated(UNAUTHENTICATED_MESSAGE)
        return principal

    def refuse(self, message: str, reason: str) -> PermissionDenied:
        """A servicer's own scope refusal, counted: `raise callers.refuse(...)`."""
        self.denials.count(reason.lower())
        return PermissionDenied(message, reason=reason)

    def tenant(self, requested: str, field: str = "tenant_id") -> str:
        """The tenant a call acts for: a tenant principal's own (an empty field means it; another is denied),
        else the one the request names (required)."""
        principal = self.principal()
        if principal.role is Role.TENANT:
            try:
                refuse_other_tenant(principal, requested, field)
            except PermissionDenied:
                self.denials.count("other_tenant")
                raise
            return principal.id
        if not requested:
            raise InvalidArgument.field(field, "is required")
        return requested

    def may_see_tenant(self, tenant_id: str) -> bool:
        """Whether a record of `tenant_id` found by id is visible (a hidden one answers NOT_FOUND: no oracle)."""
        principal = self.principal()
        return principal.role is not Role.TENANT or principal.id == tenant_id

    def carrier_routes(self, virtual_number: str) -> bool:
        """Whether the caller may act on a number as its carrier (non-carrier principals pass)."""
        principal = self.principal()
        if principal.role is not Role.CARRIER or self._directory is None:
            return True
        return self._directory.carrier_of(virtual_number) == principal.id

    def require_carrier_routes(self, virtual_number: str, field: str = "virtual_number") -> None:
        if not self.carrier_routes(virtual_number):
            raise self.refuse(f"{field}: the number is not in a block this carrier routes", "OTHER_CARRIER")

    def bind(self, principal: Principal) -> Token[Principal | None]:
        return self._current.set(principal)

    def unbind(self, token: Token[Principal | None]) -> None:
        self._current.reset(token)


class IdentityConcern:
    """The identity `CallConcern` of the call layer."""

    def __init__(
        self,
        callers: Callers,
        directory: Directory,
        audit: AuditLog,
        *,
        peer_identity: PeerIdentity | None = None,
        policy: Any = POLICY,
        clock: Clock | None = None,
    ) -> None:
        self.callers = callers
        self.directory = directory
        self.audit = audit
        self.peer_identity = peer_identity  # the client certificate's SPIFFE id (mTLS mode), else None
        self.policy = policy
        self.clock = clock or SystemClock()

    def for_method(self, method: Method) -> _MethodIdentity:
        entry = self.policy.get(method.path)
        if entry is None:
            log.warning("method has no policy entry: denied to every caller", extra={"method": method.path})
        return _MethodIdentity(self, method, entry)

    def authenticate(self, context: Any) -> Principal | None:
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                scheme, _, token = value.partition(" ")
                return self.directory.authenticate(token.strip()) if scheme.lower() == "bearer" else None
        if self.peer_identity is not None:
            spiffe_id = self.peer_identity(context)
            if spiffe_id:
                return principal_from_spiffe_id(spiffe_id)
        return None

    def unauthenticated_reason(self, context: Any) -> str:
        """Why `authenticate` found no principal (on refusals only): no credential presented, or one that is not
        valid."""
        if any(key == "authorization" for key, _ in context.invocation_metadata() or ()):
            return "invalid_token"
        if self.peer_identity is not None and self.peer_identity(context):
            return "invalid_certificate"  # its SPIFFE id names no principal
        return "missing_credentials"

    def record(
        self,
        principal: Principal | None,
        method: Method,
        entry: MethodPolicy | None,
        request: Any,
        outcome: str,
        context: Any,
    ) -> None:
        target = ""
        reason = ""
        if request is not None:
            fields = entry.target_fields if entry is not None else ()
            # An empty tenant_id is meaningful (the operator's global blocklist, a tenant's own): shown as such.
            target = ",".join(
                f"{f}={_field(request, f) or '(empty)'}"
                for f in fields
                if _field(request, f) or (f == "tenant_id" and hasattr(request, f))
            )
            reason = _field(request, "reason")
        span_context = trace.get_current_span().get_span_context()
        self.audit.record(
            AuditEvent(
                time_ms=self.clock.now_ms(),
                principal=principal.subject if principal is not None else "anonymous",
                role=principal.role.value if principal is not None else "",
                method=method.path,
                target=target[:512],
                reason=reason[:256],
                outcome=outcome,
                trace_id=format(span_context.trace_id, "032x") if span_context.is_valid else "",
                peer=str(context.peer() or "")[:128],
            )
        )


def _field(request: Any, name: str) -> str:
    """A request field's value as text ("" when unset); "a.b" is field b of message field a."""
    value = request
    for part in name.split("."):
        value = getattr(value, part, "")
    return str(value) if value not in ("", 0, None) else ""


class _MethodIdentity:
    """The identity concern bound to one method."""

    __slots__ = ("_concern", "_entry", "_method")

    def __init__(self, concern: IdentityConcern, method: Method, entry: MethodPolicy | None) -> None:
        self._concern = concern
        self._method = method
        self._entry = entry

    def enter(self, context: Any, request: Any = None) -> tuple[Token[Principal | None], Principal, Any]:
        concern = self._concern
        principal = concern.authenticate(context)
        try:
            if principal is None:
                raise Unauthenticated(UNAUTHENTICATED_MESSAGE)
            entry = self._entry
            if entry is None:
                raise PermissionDenied(f"{self._method.name} has no access policy: denied", reason="NO_POLICY")
            if not entry.allows(principal.role, principal.id):
                raise PermissionDenied(
                    f"the {principal.role.value} role may not call {self._method.name}", reason="ROLE_NOT_ALLOWED"
                )
            if request is not None:
                if principal.role in entry.reason_required and not getattr(request, "reason", ""):
                    raise InvalidArgument.field(
                        "reason", f"is required of a {principal.role.value}: a case reference for the audit trail"
                    )
                if entry.scope is Scope.TENANT_FIELD and principal.role is Role.TENANT:
                    refuse_other_tenant(principal, _field(request, entry.tenant_field), entry.tenant_field)
        except DomainError as denied:
            if isinstance(denied, PermissionDenied):
                concern.callers.denials.count(denied.reason.lower())
            elif isinstance(denied, Unauthenticated):
                concern.callers.denials.count(concern.unauthenticated_reason(context))
            concern.record(principal, self._method, self._entry, request, denied.code.name, context)
            raise
        return concern.callers.bind(principal), principal, request

    def leave(self, state: object, context: Any) -> None:
        token: Token[Principal | None]
        principal: Principal
        request: Any
        token, principal, request = state  # type: ignore[misc]
        concern = self._concern
        concern.callers.unbind(token)
        entry = self._entry
        if entry is not None and entry.audited_for(principal.role):
            concern.record(principal, self._method, entry, request, _code_name(context), context)

    def check(self, state: object) -> None:
        """On a stream: ends it when the principal's key was revoked or expired since the call began."""
        principal: Principal = state[1]  # type: ignore[index]
        if not self._concern.directory.still_valid(principal):
            self._concern.callers.denials.count("key_ended_during_stream")
            raise Unauthenticated(UNAUTHENTICATED_MESSAGE)


def _code_name(context: Any) -> str:
    code = context.code()
    if code is None:
        return "OK"
    if isinstance(code, int):
        code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    return str(code.name)
