"""Key names and handles of the allocation service (docs/allocation.md, docs/redis-schema.md "Allocation").

The key layout and the reservation handle live in numprotect.core.pool_keys (shared with the invariant checker,
numprotect.core.doctor); this module keeps the service's own helpers.
"""

from __future__ import annotations

import secrets

from numprotect.core.errors import InvalidArgument
from numprotect.core.phone import InvalidNumber, validate_city_code


def city_field(field: str, raw: str) -> str:
    if not raw:
        raise InvalidArgument.field(field, "is required")
    try:
        return validate_city_code(raw)
    except InvalidNumber as exc:
        raise InvalidArgument.field(field, str(exc)) from None


def new_rid() -> str:
    return secrets.token_hex(8)
