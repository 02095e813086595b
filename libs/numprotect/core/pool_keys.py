"""The allocation pools' key layout (docs/redis-schema.md, "Allocation"; docs/allocation.md): written by the
allocation service only, read by it and by the invariant checker (numprotect.core.doctor), so it lives here once.

Pool keys share the hash tag {pool:<tenant>:<city>}: everything one allocation reads and writes (free set,
load indexes, the numbers' reservations and history) lives in one slot, so one script picks and reserves
atomically. A block's owner record has its own tag {blk:<block>}; a tenant's city list {tenant:<tenant>}.
The pool's sub-keys (`<pool>:avail`, `:axb`, `:r:<number>`, ...) are listed in allocation's lua/pool_lib.lua.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

from numprotect.core.errors import InvalidArgument
from numprotect.core.identifiers import TENANT_ID
from numprotect.core.phone import validate_city_code, validate_virtual

_RID = re.compile(r"[0-9a-f]{16}")
_HANDLE_VERSION = "rv1"


def pool_key(tenant: str, city: str) -> str:
    """Base key of a pool (a hash: tenant, city, total); every other pool key extends it."""
    return f"np:alloc:{{pool:{tenant}:{city}}}"


def block_owner_key(block: str) -> str:
    return f"np:alloc:{{blk:{block}}}:owner"


def block_history_key(block: str) -> str:
    return f"np:alloc:{{blk:{block}}}:hist"


def tenant_cities_key(tenant: str) -> str:
    return f"np:alloc:{{tenant:{tenant}}}:cities"


def number_history_key(tenant: str, city: str, number: str) -> str:
    return f"{pool_key(tenant, city)}:hist:{number}"


def number_reservations_key(tenant: str, city: str, number: str) -> str:
    return f"{pool_key(tenant, city)}:r:{number}"


def number_hash_key(tenant: str, city: str, number: str) -> str:
    return f"{pool_key(tenant, city)}:h:{number}"


@dataclass(frozen=True)
class Handle:
    """What a reservation id encodes: enough to find its keys without a lookup."""

    tenant: str
    city: str
    number: str
    rid: str

    def encode(self) -> str:
        raw = f"{self.tenant}:{self.city}:{self.number}:{self.rid}".encode()
        return f"{_HANDLE_VERSION}.{base64.urlsafe_b64encode(raw).decode().rstrip('=')}"

    @classmethod
    def decode(cls, field: str, handle: str) -> Handle:
        if not handle:
            raise InvalidArgument.field(field, "is required")
        version, _, body = handle.partition(".")
        try:
            if version != _HANDLE_VERSION:
                raise ValueError
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
            tenant, city, number, rid = raw.split(":")
            if not (TENANT_ID.matches(tenant) and _RID.fullmatch(rid)):
                raise ValueError
            validate_city_code(city)
            validate_virtual(number)
        except (ValueError, UnicodeDecodeError):
            raise InvalidArgument.field(field, "is not a reservation id issued by AllocateNumber") from None
        return cls(tenant, city, number, rid)
