"""The policy table as Markdown, for docs/security.md (a test keeps the document equal to `POLICY`)."""

from __future__ import annotations

from collections.abc import Mapping

from numprotect.core.identity.policy import POLICY, Audit, MethodPolicy, Scope
from numprotect.core.identity.principal import Role

BEGIN = "<!-- policy-table:begin (generated: python -m numprotect.core.identity.policy_doc) -->"
END = "<!-- policy-table:end -->"
_ROLE_ORDER = (Role.OPERATOR, Role.TENANT, Role.CARRIER, Role.REGULATOR, Role.SERVICE)


def _roles(entry: MethodPolicy) -> str:
    names = []
    for role in _ROLE_ORDER:
        if role in entry.roles:
            name = role.value
            if role is Role.SERVICE and entry.services:
                name += " (" + ", ".join(sorted(entry.services)) + ")"
            if role in entry.reason_required:
                name += " + reason"
            names.append(name)
    return ", ".join(names)


def render(policy: Mapping[str, MethodPolicy] = POLICY) -> str:
    lines = [
        BEGIN,
        "| Service | Method | Roles | Scope | Audited |",
        "|---|---|---|---|---|",
    ]
    for path, entry in policy.items():
        service, _, method = path.lstrip("/").rpartition("/")
        scope = "" if entry.scope is Scope.NONE else entry.scope.value
        if entry.scope is Scope.TENANT_FIELD and entry.tenant_field != "tenant_id":
            scope = f"{entry.tenant_field} field"
        audited = {Audit.NEVER: "denials only", Audit.BY_ROLES: "operator, regulator", Audit.ALWAYS: "always"}[
            entry.audit
        ]
        lines.append(f"| `{service}` | `{method}` | {_roles(entry)} | {scope} | {audited} |")
    lines.append(END)
    return "\n".join(lines)


if __name__ == "__main__":
    print(render())
