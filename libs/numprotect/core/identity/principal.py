"""Roles and the principal of a call."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(enum.Enum):
    OPERATOR = "operator"  # the platform provider's admins
    TENANT = "tenant"  # one tenant's order systems (id = tenant_id)
    CARRIER = "carrier"  # a carrier's switches (id = carrier_id)
    REGULATOR = "regulator"  # the regulator's tracing desk
    SERVICE = "service"  # a numprotect service calling another (id = its name, e.g. "binding")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling. `id` is the tenant, carrier or service the role needs (an operator's or regulator's
    name from a certificate, else empty); `key_id` names the API key used ("" for a client certificate)."""

    role: Role
    id: str = ""
    key_id: str = ""

    @property
    def subject(self) -> str:
        """How logs and the audit trail name the caller, e.g. "tenant:acme" or "operator" (never a secret)."""
        base = f"{self.role.value}:{self.id}" if self.id else self.role.value
        return f"{base}/key:{self.key_id}" if self.key_id else base

    @property
    def tenant_id(self) -> str:
        return self.id if self.role is Role.TENANT else ""

    @property
    def carrier_id(self) -> str:
        return self.id if self.role is Role.CARRIER else ""


SPIFFE_PREFIX = "spiffe://numprotect/"


def principal_from_spiffe_id(uri: str) -> Principal | None:
    """The principal a client certificate's URI SAN names: spiffe://numprotect/<role>/<id>, or None."""
    if not uri.startswith(SPIFFE_PREFIX):
        return None
    role_name, _, ident = uri[len(SPIFFE_PREFIX) :].partition("/")
    try:
        role = Role(role_name)
    except ValueError:
        return None
    if "/" in ident or (not ident and role in (Role.TENANT, Role.CARRIER, Role.SERVICE)):
        return None
    return Principal(role, ident)
