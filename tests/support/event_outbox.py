"""Reading what the producers of events left for the events service (numprotect.core.event_keys): the outbox entries
of a slot and the hints in the rings, with any blocking client of the Redis under test (standalone or cluster)."""

from __future__ import annotations

from typing import Any

from numprotect.core import event_keys
from support.redis_state import plain


def outbox(redis_sync: Any, beside: str) -> list[dict[str, str]]:
    """The entries of the outbox in the slot of the key `beside`, oldest first, as text (d too: a CDR's payload is
    read with `outbox_payloads`)."""
    return [
        {name: value.decode(errors="replace") for name, value in _fields(fields).items()}
        for _, fields in redis_sync.xrange(event_keys.outbox_key_beside(beside))
    ]


def outbox_payloads(redis_sync: Any, beside: str) -> list[bytes]:
    """The `d` field of each entry of the outbox beside `beside`, as bytes."""
    return [_fields(fields)["d"] for _, fields in redis_sync.xrange(event_keys.outbox_key_beside(beside))]


def all_outbox_entries(redis_sync: Any) -> list[dict[str, str]]:
    """Every outbox entry of every slot (SCAN for np:ev:o:*)."""
    found: list[dict[str, str]] = []
    for key in sorted(plain(k) for k in redis_sync.scan_iter(match=event_keys.PREFIX + "o:*", count=1000)):
        for _, fields in redis_sync.xrange(key):
            found.append({name: value.decode(errors="replace") for name, value in _fields(fields).items()})
    return found


def hinted(redis_sync: Any, beside: str) -> bool:
    """Whether the slot of `beside` is in its ring."""
    slot = event_keys.key_slot(beside)
    return bool(redis_sync.sismember(event_keys.ring_key(slot), str(slot)))


def expiry_hint(redis_sync: Any, beside: str) -> float | None:
    """The slot of `beside`'s score in its expiry ring (None: not there)."""
    slot = event_keys.key_slot(beside)
    score = redis_sync.zscore(event_keys.expiry_ring_key(slot), str(slot))
    return None if score is None else float(score)


def expiries(redis_sync: Any, beside: str) -> dict[str, int]:
    """The binding expiries of the slot of `beside`: binding id -> expire ms."""
    members = redis_sync.zrange(event_keys.expiry_key_beside(beside), 0, -1, withscores=True)
    return {plain(member): int(score) for member, score in members}


def _fields(fields: Any) -> dict[str, bytes]:
    return {plain(name): value for name, value in fields.items()}
