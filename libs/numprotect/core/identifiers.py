"""The identifier rules of the platform, one per kind of id, each checked the same way in every service.

A rule that fails is INVALID_ARGUMENT naming the field and stating the rule (google.rpc.BadRequest). Tenant ids
and order ids end up inside Redis Cluster hash tags ({t:<tenant>}, {pool:<tenant>:<city>}, ...): the rules
keep out braces and, for tenants, colons, so every key of a tenant hashes where its layout says.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from numprotect.core.errors import FieldViolation, InvalidArgument


@dataclass(frozen=True)
class IdentifierRule:
    """A kind of identifier: the pattern a whole value must match and the rule as the caller reads it."""

    pattern: re.Pattern[str]
    # What the caller is told, after the field name: "tenant_id: must be 1-64 letters, ...".
    description: str

    def matches(self, raw: str) -> bool:
        return self.pattern.fullmatch(raw) is not None

    def violation(self, field: str, raw: str, *, required: bool = True) -> FieldViolation | None:
        """What is wrong with `raw` as this field, or None. An empty value is fine only when not required."""
        if not raw:
            return FieldViolation(field, "is required") if required else None
        if not self.matches(raw):
            return FieldViolation(field, self.description)
        return None

    def check(self, field: str, raw: str, *, required: bool = True) -> str:
        """`raw` when it follows the rule (or is empty and not required); otherwise INVALID_ARGUMENT on `field`."""
        problem = self.violation(field, raw, required=required)
        if problem is not None:
            raise InvalidArgument(problem)
        return raw


# The one tenant-id rule of the platform (usable inside a hash tag: no braces, no colons).
TENANT_ID = IdentifierRule(
    re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"),
    "must be 1-64 letters, digits, '_', '.' or '-', starting alphanumeric",
)
# A carrier's id (ImportBlock, API keys, the SPIFFE id of a carrier's certificate): the tenant rule's alphabet.
CARRIER_ID = IdentifierRule(
    re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"),
    "must be 1-64 letters, digits, '_', '.' or '-', starting alphanumeric",
)
# A tenant's order id: the idempotency key of CreateBinding together with the tenant id.
OUT_ORDER_ID = IdentifierRule(
    re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}"),
    "must be 1-128 letters, digits, '_', '.', ':' or '-', starting alphanumeric",
)
# What CreateBinding issues: "b" and 22 hex digits (binding.store.new_binding_id).
BINDING_ID = IdentifierRule(
    re.compile(r"b[0-9a-f]{22}"),
    "is not a binding id issued by CreateBinding",
)
# A carrier's call id on a CDR: visible ASCII only, so it can sit in a key and a log line as it is.
CALL_ID_MAX = 128
CALL_ID = IdentifierRule(
    re.compile(rf"[\x21-\x7e]{{1,{CALL_ID_MAX}}}"),
    f"must be at most {CALL_ID_MAX} visible ASCII characters only (no spaces or control characters)",
)
