"""Request validation: every violation of a request is reported at once, each naming its field."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from numprotect.binding.v1 import binding_pb2 as pb
from numprotect.core import errors
from numprotect.core.conversions import bounded_duration_ms, timestamp_ms
from numprotect.core.errors import FailedPrecondition, InvalidArgument
from numprotect.core.identifiers import BINDING_ID, OUT_ORDER_ID, TENANT_ID
from numprotect.core.phone import InvalidNumber, normalize_party, validate_city_code, validate_extension
from numprotect.core.routes import MODE_AXB, MODE_AXE, MODE_AXN, RESTRICTION_NONE

MODES = {MODE_AXB: "AXB", MODE_AXN: "AXN", MODE_AXE: "AXE"}
RESTRICTIONS = (1, 2, 3)
UPDATABLE = ("expire_time", "party_b", "call_restriction", "recording_enabled")
# How much of a caller's unknown update_mask paths an error quotes: a status message travels in a trailer, and a
# long one (a 70 KB path) exceeds the client's metadata limit, which then sees RESOURCE_EXHAUSTED, not the error.
_QUOTED_PATHS = 3
_QUOTED_PATH_LENGTH = 40
_Message = TypeVar("_Message")


@dataclass(frozen=True)
class CreateSpec:
    tenant_id: str
    out_order_id: str
    mode: int
    party_a: str
    party_b: str
    ttl_ms: int
    city_code: str
    strict_city: bool
    call_restriction: int
    recording_enabled: bool
    allow_any_caller: bool


@dataclass(frozen=True)
class UpdateSpec:
    binding_id: str
    tenant_id: str
    paths: frozenset[str]
    expire_ms: int
    party_b: str
    call_restriction: int
    recording_enabled: bool


class Violations(errors.Violations):
    """The shared collector (numprotect.core.errors.Violations), with binding's own readers."""

    def party(self, field: str, raw: str) -> str:
        try:
            return normalize_party(raw)
        except InvalidNumber as exc:
            self.add(field, str(exc))
            return ""

    def milliseconds(self, read: Callable[..., int], field: str, value: _Message, *bounds: int) -> int | None:
        """`read(field, value, *bounds)` (a numprotect.core.conversions reader), or None noting its violation."""
        try:
            return read(field, value, *bounds)
        except InvalidArgument as exc:
            self.items.extend(exc.violations)
            return None


def ids(field_prefix: str, binding: str, tenant: str) -> tuple[str, str]:
    violations = Violations()
    result = (
        violations.identifier(BINDING_ID, f"{field_prefix}binding_id", binding),
        violations.identifier(TENANT_ID, f"{field_prefix}tenant_id", tenant),
    )
    violations.raise_if_any()
    return result


def _restriction(field: str, value: int, violations: Violations) -> int:
    if value == 0:
        return RESTRICTION_NONE
    if value not in RESTRICTIONS:
        violations.add(field, "must be CALL_RESTRICTION_NONE, _A_TO_B_ONLY or _B_TO_A_ONLY")
    return value


def create_spec(
    request: pb.CreateBindingRequest, *, tenant_id: str, min_ttl_ms: int, max_ttl_ms: int, default_ttl_ms: int
) -> CreateSpec:
    """`tenant_id`: the tenant the call acts for (the caller's, see servicer), "" when the caller named none."""
    v = Violations()
    tenant = v.identifier(TENANT_ID, "tenant_id", tenant_id)
    if not request.out_order_id:
        v.add("out_order_id", "is required (it is the idempotency key with tenant_id)")
    else:
        v.identifier(OUT_ORDER_ID, "out_order_id", request.out_order_id)
    mode = int(request.mode)
    if mode not in MODES:
        v.add("mode", "must be BINDING_MODE_AXB, BINDING_MODE_AXN or BINDING_MODE_AXE")
    party_a = v.party("party_a", request.party_a)
    # AXN: the default party N is optional.
    party_b = "" if mode == MODE_AXN and not request.party_b else v.party("party_b", request.party_b)
    if party_a and party_b and party_a == party_b:
        v.add("party_b", "must differ from party_a")
    if request.allow_any_caller and mode != MODE_AXE:
        v.add("allow_any_caller", "applies to BINDING_MODE_AXE only")
    ttl_ms = default_ttl_ms
    if request.HasField("ttl"):
        ttl_ms = v.milliseconds(bounded_duration_ms, "ttl", request.ttl, min_ttl_ms, max_ttl_ms) or default_ttl_ms
    if not request.city_code:
        v.add("city_code", "is required (the area code the number should come from, e.g. 010)")
    else:
        try:
            validate_city_code(request.city_code)
        except InvalidNumber as exc:
            v.add("city_code", str(exc))
    restriction = _restriction("call_restriction", int(request.call_restriction), v)
    v.raise_if_any()
    if not request.user_consent:
        raise FailedPrecondition(
            "user_consent: the protected user must agree to number protection", type_="CONSENT", subject="user_consent"
        )
    return CreateSpec(
        tenant_id=tenant,
        out_order_id=request.out_order_id,
        mode=mode,
        party_a=party_a,
        party_b=party_b,
        ttl_ms=ttl_ms,
        city_code=request.city_code,
        strict_city=request.strict_city,
        call_restriction=restriction,
        recording_enabled=request.recording_enabled,
        allow_any_caller=request.allow_any_caller,
    )


def update_spec(request: pb.UpdateBindingRequest, *, tenant_id: str) -> UpdateSpec:
    """Checks ids, the mask and the shape of the new values (rules needing the record come later); `tenant_id` as
    in create_spec."""
    v = Violations()
    binding = request.binding
    bid = v.identifier(BINDING_ID, "binding.binding_id", binding.binding_id)
    tenant = v.identifier(TENANT_ID, "binding.tenant_id", tenant_id)
    paths = [p.removeprefix("binding.") for p in request.update_mask.paths]
    unknown = sorted({p for p in paths if p not in UPDATABLE})
    if not paths:
        v.add("update_mask", f"name at least one of: {', '.join(UPDATABLE)}")
    elif unknown:
        v.add("update_mask", f"cannot update {_quoted(unknown)}; updatable: {', '.join(UPDATABLE)}")
    expire_ms = 0
    if "expire_time" in paths:
        if not binding.HasField("expire_time"):
            v.add("binding.expire_time", "is required when update_mask names it")
        else:
            expire_ms = v.milliseconds(timestamp_ms, "binding.expire_time", binding.expire_time) or 0
    party_b = ""
    if "party_b" in paths and binding.party_b:
        party_b = v.party("binding.party_b", binding.party_b)
    restriction = RESTRICTION_NONE
    if "call_restriction" in paths:
        restriction = _restriction("binding.call_restriction", int(binding.call_restriction), v)
    v.raise_if_any()
    return UpdateSpec(
        binding_id=bid,
        tenant_id=tenant,
        paths=frozenset(paths),
        expire_ms=expire_ms,
        party_b=party_b,
        call_restriction=restriction,
        recording_enabled=binding.recording_enabled,
    )


def _quoted(paths: list[str]) -> str:
    """The first few paths, each cut short: enough to find the mistake, bounded whatever the caller sent."""
    shown = [repr(p) if len(p) <= _QUOTED_PATH_LENGTH else repr(p[:_QUOTED_PATH_LENGTH]) + "..." for p in paths]
    more = len(paths) - _QUOTED_PATHS
    return ", ".join(shown[:_QUOTED_PATHS]) + (f" and {more} more" if more > 0 else "")


def extension_filter(raw: str) -> str:
    if not raw:
        return ""
    try:
        return validate_extension(raw)
    except InvalidNumber as exc:
        raise InvalidArgument.field("extension", str(exc)) from None
