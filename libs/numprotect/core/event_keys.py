"""The events key layout (docs/redis-schema.md, section Events; docs/events.md): written by the services whose state
changes cause events (binding, allocation, cdr: the outboxes) and by the events service (everything else).

Durability: an event is recorded by the same script that makes the state change, into an *outbox* in the slot of
the changed key (Redis Cluster runs a script in one slot). State changes happen in every slot (a binding record's
slot is its id's), so there is one outbox per slot, named with a hash tag that hashes to that slot
(`slot_tag`). A writer then adds the slot to a *ring* (`ring_key`), a hint in another slot sent in the same
pipeline: the events service drains the slots it finds there at once, and sweeps every slot's outbox now and then
(NUMPROTECT_EVENTS_SWEEP_INTERVAL) so a hint lost with a crashed writer delays an event, never loses it.

Per slot s (tag T = slot_tag(s)):
    np:ev:o:{T}          STREAM  outbox: fields ty (event type), tn (tenant), at (event ms), src (the changed
                                 thing: a binding id, a virtual number, a CDR's "<carrier>|<call_id>"), n (the
                                 binding record's event index, binding events), d (type-specific data: the stored
                                 CallDetailRecord bytes, "<window_ms>|<short>|<unanswered>|<total>" of an abuse flag
                                 (src "X|caller"), "reason|actor"; docs/redis-schema.md, Events)
    np:ev:x:{T}          ZSET    binding expiries: binding id -> expire ms, for committed, undeleted bindings
                                 whose record is in slot s (binding_record_update.lua keeps it)
    np:ev:lease:{T}      STRING  the events process routing the outbox now (a token; PX a few seconds), so two
                                 routers do not render the same entries (routing is idempotent either way)
Rings (NUMBER_OF_RINGS shards, the slot's shard = slot % NUMBER_OF_RINGS):
    np:ev:ring:{ring<k>}     SET   slots whose outbox got entries (hint)
    np:ev:xring:{xring<k>}   ZSET  slot -> earliest binding expiry in its np:ev:x (hint; may be early, never late)

Per tenant (tag {ev:t:<tenant>}; every key one tenant's delivery touches is in one slot):
    np:ev:{ev:t:<tn>}:log           STREAM  the tenant's events: id (event id), ty, at, p (the single-event
                                            webhook body, JSON); trimmed by MINID (now - retention)
    np:ev:{ev:t:<tn>}:seen:<event_id>  STRING  the log entry id of a routed event (routing is idempotent); PX
                                               retention
    np:ev:{ev:t:<tn>}:eps           HASH    endpoint id -> Endpoint (protobuf bytes, with its secrets)
    np:ev:{ev:t:<tn>}:q:<ep>        ZSET    log entry id -> due ms (queued deliveries)
    np:ev:{ev:t:<tn>}:f:<ep>        ZSET    log entry id -> lease end ms (in flight at a dispatcher)
    np:ev:{ev:t:<tn>}:a:<ep>        HASH    log entry id -> attempts made so far (queued, in flight or dead)
    np:ev:{ev:t:<tn>}:dl:<ep>       ZSET    log entry id -> dead ms (dead letters)
    np:ev:{ev:t:<tn>}:dle:<ep>      HASH    log entry id -> last error of a dead letter
    np:ev:{ev:t:<tn>}:att:<ep>      STREAM  delivery attempts (ListDeliveries), trimmed by MINID (retention)
    np:ev:{ev:t:<tn>}:st:<ep>       HASH    delivery state of the endpoint: pause (ms until which nothing is sent:
                                            Retry-After, 429/5xx backoff), fails (consecutive failed requests)
    np:ev:{ev:t:<tn>}:ready         ZSET    endpoint id -> earliest ms at which it may have work to claim (writers
                                            that add due work lower it with ZADD LT; the claim script resets it)
Global:
    np:ev:{tenants}                 SET     tenants that have (or had) endpoints: what dispatchers poll

Tenant ids hold no ':' or braces (identifiers.TENANT_ID); endpoint ids and event ids are [A-Za-z0-9_].
"""

from __future__ import annotations

import base64
import hashlib
from functools import cache

from redis.crc import REDIS_CLUSTER_HASH_SLOTS
from redis.crc import key_slot as redis_key_slot

CLUSTER_SLOTS = REDIS_CLUSTER_HASH_SLOTS
NUMBER_OF_RINGS = 16
# The most slots one ring can hold (a slot's ring is slot % NUMBER_OF_RINGS): what one read of a ring takes.
SLOTS_PER_RING = CLUSTER_SLOTS // NUMBER_OF_RINGS
PREFIX = "np:ev:"

# Event types (docs/events.md).
BINDING_CREATED = "binding.created"
BINDING_UPDATED = "binding.updated"
BINDING_DELETED = "binding.deleted"
BINDING_EXPIRED = "binding.expired"
CDR_CREATED = "cdr.created"
ABUSE_FLAGGED = "abuse.flagged"
NUMBER_LOCKED = "number.locked"
NUMBER_UNLOCKED = "number.unlocked"
EVENT_TYPES = (
    BINDING_CREATED,
    BINDING_UPDATED,
    BINDING_DELETED,
    BINDING_EXPIRED,
    CDR_CREATED,
    ABUSE_FLAGGED,
    NUMBER_LOCKED,
    NUMBER_UNLOCKED,
)


def key_slot(key: str) -> int:
    """The Redis Cluster slot of a key (its hash tag's, if it has one), as Redis computes it."""
    return redis_key_slot(key.encode())


@cache
def _slot_tags() -> tuple[str, ...]:
    # The first string "e<hex>" that hashes to each slot: computed once per process (~0.2 s), the same everywhere.
    tags: list[str | None] = [None] * CLUSTER_SLOTS
    missing = CLUSTER_SLOTS
    i = 0
    while missing:
        tag = f"e{i:x}"
        slot = redis_key_slot(tag.encode())
        if tags[slot] is None:
            tags[slot] = tag
            missing -= 1
        i += 1
    return tuple(tag for tag in tags if tag is not None)


def slot_tag(slot: int) -> str:
    """A hash tag (without braces) that hashes to `slot`."""
    return _slot_tags()[slot]


def outbox_key(slot: int) -> str:
    return f"{PREFIX}o:{{{slot_tag(slot)}}}"


def expiry_key(slot: int) -> str:
    return f"{PREFIX}x:{{{slot_tag(slot)}}}"


def route_lease_key(slot: int) -> str:
    return f"{PREFIX}lease:{{{slot_tag(slot)}}}"


def outbox_key_beside(key: str) -> str:
    """The outbox in the slot of `key` (a script writing `key` records its events there)."""
    return outbox_key(key_slot(key))


def expiry_key_beside(key: str) -> str:
    return expiry_key(key_slot(key))


def ring_key(slot: int) -> str:
    return f"{PREFIX}ring:{{ring{slot % NUMBER_OF_RINGS}}}"


def expiry_ring_key(slot: int) -> str:
    return f"{PREFIX}xring:{{xring{slot % NUMBER_OF_RINGS}}}"


def ring_keys() -> tuple[str, ...]:
    return tuple(ring_key(k) for k in range(NUMBER_OF_RINGS))


def expiry_ring_keys() -> tuple[str, ...]:
    return tuple(expiry_ring_key(k) for k in range(NUMBER_OF_RINGS))


TENANTS_KEY = PREFIX + "{tenants}"


class TenantKeys:
    """The keys of one tenant's events and endpoints (one slot)."""

    __slots__ = ("prefix", "tenant_id")

    def __init__(self, tenant_id: str) -> None:
        self.tenant_id = tenant_id
        self.prefix = f"{PREFIX}{{ev:t:{tenant_id}}}:"

    @property
    def log(self) -> str:
        return self.prefix + "log"

    def seen(self, event_id: str) -> str:
        return f"{self.prefix}seen:{event_id}"

    @property
    def endpoints(self) -> str:
        return self.prefix + "eps"

    @property
    def ready(self) -> str:
        return self.prefix + "ready"

    def queue(self, endpoint_id: str) -> str:
        return f"{self.prefix}q:{endpoint_id}"

    def in_flight(self, endpoint_id: str) -> str:
        return f"{self.prefix}f:{endpoint_id}"

    def attempts(self, endpoint_id: str) -> str:
        return f"{self.prefix}a:{endpoint_id}"

    def dead(self, endpoint_id: str) -> str:
        return f"{self.prefix}dl:{endpoint_id}"

    def dead_errors(self, endpoint_id: str) -> str:
        return f"{self.prefix}dle:{endpoint_id}"

    def deliveries(self, endpoint_id: str) -> str:
        return f"{self.prefix}att:{endpoint_id}"

    def state(self, endpoint_id: str) -> str:
        return f"{self.prefix}st:{endpoint_id}"

    def endpoint_keys(self, endpoint_id: str) -> tuple[str, ...]:
        """Every key of one endpoint (DeleteEndpoint removes them)."""
        return (
            self.queue(endpoint_id),
            self.in_flight(endpoint_id),
            self.attempts(endpoint_id),
            self.dead(endpoint_id),
            self.dead_errors(endpoint_id),
            self.deliveries(endpoint_id),
            self.state(endpoint_id),
        )


def event_id(event_type: str, source: str, discriminator: str) -> str:
    """The event's id: "evt_" + 26 base32 characters of a hash of what it is (its type, the changed thing, and the
    binding record's event index or the expiry ms or the outbox entry's data). A producer's script that runs twice
    writes two outbox entries with one id; routing keeps the first, so a receiver sees one id, on every retry."""
    digest = hashlib.sha256(f"{event_type}|{source}|{discriminator}".encode()).digest()
    return "evt_" + base64.b32encode(digest).decode()[:26].lower()
