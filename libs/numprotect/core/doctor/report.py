"""What the invariant checker found: violations by kind, what it read, and the two ways to show them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# The invariants, by the name each violation carries (docs/operations.md, "Checking invariants").
ROUTE_WITHOUT_BINDING = "route_without_binding"
BINDING_WITHOUT_ROUTES = "binding_without_routes"
RESERVATION_WITHOUT_BINDING = "reservation_without_binding"
NUMBER_IN_TWO_POOLS = "number_in_two_pools"
POOL_COUNTERS = "pool_counters"
DUPLICATE_CDR = "duplicate_cdr"
CDR_WRONG_BUCKET = "cdr_wrong_bucket"
BINDING_HISTORY_GAP = "binding_history_gap"
KINDS = (
    ROUTE_WITHOUT_BINDING,
    BINDING_WITHOUT_ROUTES,
    RESERVATION_WITHOUT_BINDING,
    NUMBER_IN_TWO_POOLS,
    POOL_COUNTERS,
    DUPLICATE_CDR,
    CDR_WRONG_BUCKET,
    BINDING_HISTORY_GAP,
)
_DESCRIPTIONS = {
    ROUTE_WITHOUT_BINDING: "route key without an active binding",
    BINDING_WITHOUT_ROUTES: "active binding without its routes",
    RESERVATION_WITHOUT_BINDING: "reservation without a binding past its lease",
    NUMBER_IN_TWO_POOLS: "number in two pools (or claimed by another tenant)",
    POOL_COUNTERS: "pool counters that disagree with the pool's members",
    DUPLICATE_CDR: "more than one CDR per call_id",
    CDR_WRONG_BUCKET: "CDR outside the bucket its virtual number maps to",
    BINDING_HISTORY_GAP: "binding history gap",
}


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken invariant. `key` is the Redis key it was found on, with party numbers masked (as in logs)."""

    kind: str
    key: str
    detail: str
    binding_id: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "key": self.key, "detail": self.detail, "binding_id": self.binding_id}


@dataclass
class Report:
    """Counts per kind are exact; `violations` keeps at most `listed_per_kind` of each kind (memory stays bounded).

    `scanned` counts the keys read per family, `in_flight` what was skipped because a create, update or delete was
    still within its lease, `unchecked` what could not be judged (e.g. a CDR whose dedup key has expired).
    """

    listed_per_kind: int = 100
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    violations: list[Violation] = field(default_factory=list)
    scanned: dict[str, int] = field(default_factory=dict)
    walked: int = 0  # keys SCAN returned (a key may come twice)
    in_flight: int = 0
    unchecked: dict[str, int] = field(default_factory=dict)
    nodes: int = 0
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return not any(self.counts.values())

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, violation: Violation) -> None:
        self.counts[violation.kind] = self.counts.get(violation.kind, 0) + 1
        if self.counts[violation.kind] <= self.listed_per_kind:
            self.violations.append(violation)

    def count(self, family: str, n: int = 1) -> None:
        self.scanned[family] = self.scanned.get(family, 0) + n

    def note_unchecked(self, what: str, n: int = 1) -> None:
        self.unchecked[what] = self.unchecked.get(what, 0) + n

    def of_kind(self, kind: str) -> list[Violation]:
        return [v for v in self.violations if v.kind == kind]

    def as_dict(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "violations_total": self.total,
            "counts": dict(self.counts),
            "violations": [v.as_dict() for v in self.violations],
            "listed_per_kind": self.listed_per_kind,
            "scanned": dict(sorted(self.scanned.items())),
            "walked": self.walked,
            "in_flight": self.in_flight,
            "unchecked": dict(sorted(self.unchecked.items())),
            "nodes": self.nodes,
            "seconds": round(self.seconds, 3),
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True)

    def to_text(self, examples: int = 3) -> str:
        """The operator's summary: one line per invariant with its count, and a few examples of each broken one."""
        scanned = ", ".join(f"{n} {family}" for family, n in sorted(self.scanned.items())) or "nothing"
        lines = [
            f"numprotect-doctor: {'clean' if self.clean else f'{self.total} violation(s)'} "
            f"({self.walked} keys on {self.nodes} node(s) in {self.seconds:.1f} s; read {scanned})"
        ]
        for kind in KINDS:
            n = self.counts.get(kind, 0)
            lines.append(f"  {'FAIL' if n else 'ok  '} {n:>7}  {kind}: {_DESCRIPTIONS[kind]}")
            for violation in self.of_kind(kind)[:examples]:
                lines.append(f"           {violation.key}: {violation.detail}")
        if self.in_flight:
            lines.append(f"  skipped {self.in_flight} item(s) of a create, update or delete still within its lease")
        for what, n in sorted(self.unchecked.items()):
            lines.append(f"  not judged: {n} {what}")
        return "\n".join(lines)
