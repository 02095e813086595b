"""The router: outbox entries -> each tenant's event log and the queues of the endpoints that want them.

Every poll interval it drains the slots the rings name (SPOP: a hint each producer adds beside its outbox entry),
and every sweep interval every slot whose outbox holds anything (XLEN of all of them: slot_sweep.py), so a hint lost
with a crashed producer, or with a router that took it and died, delays an event, never loses it. Per slot it
takes a short lease and the oldest entries (outbox_take.lua), renders them (render.py), routes them per tenant
(route.lua, in the tenant's slot: seen-dedup, log, queues) and removes them from the outbox (outbox_done.lua).

Several events processes may route at once: the lease keeps two from rendering the same slot's entries, and the
seen keys make routing idempotent whatever happens (a process that dies between route and removal leaves entries
that are routed again as no-ops). An entry no event can be made of (no tenant, a malformed entry, a binding whose
record is gone) is counted (numprotect_events_dropped_total{reason}), logged, and removed: it must not hold up
the outbox. A Redis failure leaves the entries for the next round.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from opentelemetry import trace

from numprotect.core import event_keys
from numprotect.core.clock import Clock
from numprotect.core.event_keys import TenantKeys
from numprotect.core.identifiers import TENANT_ID
from numprotect.core.metrics import Metrics
from numprotect.core.periodic import Periodic
from numprotect.core.redis_batch import Command, send_together
from numprotect.core.redis_client import KeyOrArg, LuaScript, RedisClient, as_text
from numprotect.core.telemetry.attributes import mask_numbers, set_span_attributes
from numprotect.services.events.endpoints import StoredEndpoint
from numprotect.services.events.render import OutboxEntry, RenderedEvent, Renderer, Unrenderable
from numprotect.services.events.settings import EventsSettings
from numprotect.services.events.slot_sweep import error_text, sweep_slots

log = logging.getLogger(__name__)

# Entries read from one slot's outbox at a time; a slot that gave this many is read again at once.
ENTRIES_PER_TAKE = 200
# Slots read together (their leases taken, their entries rendered and routed in one go).
SLOTS_PER_BATCH = 64
# Reads of full slots of a batch in one drain before the rest is left to the next poll (re-hinted).
MAX_TAKES_PER_DRAIN = 10
# How long a router holds a slot's outbox: a router that dies holding it delays the slot's events this long.
LEASE_MS = 5000
# Events per route.lua call (one tenant's).
EVENTS_PER_ROUTE = 100
# How long a tenant's endpoints are reused before they are read again: an endpoint created or changed starts
# receiving events at most this late.
ENDPOINT_CACHE_SECONDS = 1.0
# numprotect_events_route_lag_seconds: 10 ms .. 1 h.
LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600)


class EndpointSource(Protocol):
    async def stored(self, tenant_id: str) -> list[StoredEndpoint]: ...


class RouterCounts:
    """numprotect_events_routed_total{type}, numprotect_events_route_lag_seconds,
    numprotect_events_dropped_total{reason} and numprotect_events_outbox_entries."""

    def __init__(self, metrics: Metrics) -> None:
        routed = metrics.counter(
            "numprotect_events_routed_total", "Events appended to a tenant's log (each event once), by type", ("type",)
        )
        self.routed = {event_type: routed.labels(event_type) for event_type in event_keys.EVENT_TYPES}
        self.lag = metrics.histogram(
            "numprotect_events_route_lag_seconds",
            "Seconds from an event (its state change; a binding's expiry instant) to its routing",
            buckets=LAG_BUCKETS,
        )
        self.dropped = metrics.counter(
            "numprotect_events_dropped_total",
            "Outbox entries no event could be made of (dropped), by reason",
            ("reason",),
        )
        # Global (every process's sweep reads every slot): the rules take the max over processes. It grows when
        # producers run and no router keeps up (or none runs).
        self.outbox_entries = metrics.gauge(
            "numprotect_events_outbox_entries",
            "Entries waiting in all slots' outboxes (not yet routed) at this process's last sweep",
        )


class EndpointCache:
    """A tenant's endpoints, read at most once per ENDPOINT_CACHE_SECONDS (one process's router)."""

    def __init__(self, source: EndpointSource, ttl_seconds: float = ENDPOINT_CACHE_SECONDS) -> None:
        self.source = source
        self.ttl = ttl_seconds
        self._cached: dict[str, tuple[float, list[StoredEndpoint]]] = {}

    async def of(self, tenant_ids: Iterable[str]) -> dict[str, list[StoredEndpoint]]:
        """The endpoints of each tenant; a tenant whose endpoints could not be read is left out (logged): its
        events wait in the outbox, the other tenants' are routed."""
        now = time.monotonic()
        wanted = list(dict.fromkeys(tenant_ids))
        stale = [t for t in wanted if t not in self._cached or self._cached[t][0] <= now]
        if stale:
            fresh = await asyncio.gather(*(self.source.stored(t) for t in stale), return_exceptions=True)
            for tenant_id, endpoints in zip(stale, fresh, strict=True):
                if isinstance(endpoints, BaseException):
                    if not isinstance(endpoints, Exception):
                        raise endpoints  # a cancellation
                    log.warning(
                        "events endpoints unreadable", extra={"tenant_id": tenant_id, "error": error_text(endpoints)}
                    )
                    self._cached.pop(tenant_id, None)
                else:
                    self._cached[tenant_id] = (now + self.ttl, endpoints)
        for tenant_id in [t for t, (until, _) in self._cached.items() if until <= now]:
            del self._cached[tenant_id]
        return {t: self._cached[t][1] for t in wanted if t in self._cached}


@dataclass
class _Taken:
    """One slot's entries of this drain: what to remove from its outbox once routed."""

    slot: int
    count: int
    done: list[str] = field(default_factory=list)


class Router:
    _take_script = LuaScript.beside(__file__, "outbox_take.lua")
    _done_script = LuaScript.beside(__file__, "outbox_done.lua")
    _route_script = LuaScript.beside(__file__, "route.lua")

    def __init__(
        self,
        redis: RedisClient,
        settings: EventsSettings,
        endpoints: EndpointSource,
        metrics: Metrics,
        clock: Clock,
        *,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.redis = redis
        # An "events route" span per drain with slots to read (rounds that find nothing make none).
        self.tracer = tracer if tracer is not None else trace.NoOpTracer()
        self._dropped = 0  # entries dropped in the current drain
        self.settings = settings
        self.endpoints = EndpointCache(endpoints)
        self.counts = RouterCounts(metrics)
        self.clock = clock
        self.renderer = Renderer(redis)
        self.retention_ms = int(settings.retention_s * 1000)
        self._token = secrets.token_hex(8)
        self._next_sweep = 0.0
        self._scripts_loaded = False
        self._periodic = Periodic("events router", self.round, settings.poll_interval_s)

    def start(self) -> None:
        self._periodic.start()

    async def close(self) -> None:
        await self._periodic.stop()

    async def round(self) -> int:
        """The slots the rings name, and every slot's outbox when a sweep is due; returns the events routed."""
        slots = await self.hinted_slots()
        if time.monotonic() >= self._next_sweep:
            slots |= await self.slots_with_entries()
            self._next_sweep = time.monotonic() + self.settings.sweep_interval_s
        return await self.drain(slots)

    async def poll(self) -> int:
        """Drains the slots the rings name (taking the hints)."""
        return await self.drain(await self.hinted_slots())

    async def sweep(self) -> int:
        """Drains every slot whose outbox holds anything, hinted or not."""
        return await self.drain(await self.slots_with_entries())

    async def hinted_slots(self) -> set[int]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for ring in event_keys.ring_keys():
                pipe.spop(ring, event_keys.SLOTS_PER_RING)
            replies = await pipe.execute()
        return {int(as_text(slot)) for members in replies for slot in (members or ())}

    async def slots_with_entries(self) -> set[int]:
        """The slots whose outbox holds entries; the sum of their lengths is numprotect_events_outbox_entries."""
        lengths = await sweep_slots(self.redis, "length", event_keys.outbox_key)
        self.counts.outbox_entries.set(sum(lengths.values()))
        return set(lengths)

    async def drain(self, slots: Iterable[int]) -> int:
        """Routes what the slots' outboxes hold, SLOTS_PER_BATCH slots at a time; a slot another router holds, or
        still full after MAX_TAKES_PER_DRAIN reads, is hinted again for the next poll. Returns the events routed."""
        pending = sorted(set(slots))
        if not pending:
            return 0
        with self.tracer.start_as_current_span("events route") as span:
            self._dropped = 0
            routed, again = await self._drain(pending)
            # Counts only: bounded, no tenant, number or entry id.
            set_span_attributes(
                span, slots=len(pending), events_routed=routed, entries_dropped=self._dropped, slots_left=len(again)
            )
            return routed

    async def _drain(self, pending: Sequence[int]) -> tuple[int, list[int]]:
        if not self._scripts_loaded:
            # Loaded once up front: else the first drain's every command comes back NOSCRIPT and is sent again.
            for script in (self._take_script, self._done_script, self._route_script):
                await script.load(self.redis)
            self._scripts_loaded = True
        routed = 0
        again: list[int] = []
        # A batch of slots at a time: what one read takes (at most SLOTS_PER_BATCH * ENTRIES_PER_TAKE entries) is
        # routed well within the lease, and a backlog in every slot is not read into memory at once.
        for start in range(0, len(pending), SLOTS_PER_BATCH):
            batch = pending[start : start + SLOTS_PER_BATCH]
            for _ in range(MAX_TAKES_PER_DRAIN):
                if not batch:
                    break
                full, held, count = await self._drain_once(batch)
                routed += count
                again += held
                batch = full
            again += batch
        if again:
            async with self.redis.pipeline(transaction=False) as pipe:
                for slot in again:
                    pipe.sadd(event_keys.ring_key(slot), slot)
                await pipe.execute()
        return routed, again

    async def _drain_once(self, slots: Sequence[int]) -> tuple[list[int], list[int], int]:
        """One read of each slot: (slots that gave a full read, slots another router holds, events routed)."""
        commands = [
            Command.run(
                self._take_script,
                [event_keys.outbox_key(slot), event_keys.route_lease_key(slot)],
                [self._token, LEASE_MS, ENTRIES_PER_TAKE],
            )
            for slot in slots
        ]
        replies = await send_together(self.redis, commands)
        taken: list[_Taken] = []
        entries: list[OutboxEntry] = []
        held: list[int] = []
        # The slot each entry came from: entry ids are unique within a stream only (two outboxes written in the
        # same millisecond give the same ids), so entries are told apart by their place here, never by id.
        owners: list[_Taken] = []
        for slot, reply in zip(slots, replies, strict=True):
            if isinstance(reply, Exception):
                log.warning("events outbox read failed", extra={"slot": slot, "error": error_text(reply)})
                continue
            if reply is None:
                held.append(slot)
                continue
            took = _Taken(slot, len(reply))
            taken.append(took)
            for raw_id, fields in reply:
                entry_id = as_text(raw_id)
                try:
                    entries.append(OutboxEntry.decode(entry_id, _pairs(fields)))
                    owners.append(took)
                except Unrenderable as exc:
                    self._drop(exc, entry_id, {})
                    took.done.append(entry_id)
        routed = 0
        try:
            if entries:
                routed = await self._route(entries, owners)
        finally:
            await self._finish(taken)
        full = [t.slot for t in taken if t.count >= ENTRIES_PER_TAKE]
        return full, held, routed

    async def _route(self, entries: Sequence[OutboxEntry], owners: Sequence[_Taken]) -> int:
        """Routes `entries` (each taken from the slot `owners` names at its place); each one routed or dropped is
        added to its slot's done list."""
        rendered = await self.renderer.render(entries)
        by_tenant: dict[str, list[tuple[_Taken, RenderedEvent]]] = {}
        for entry, owner, outcome in zip(entries, owners, rendered, strict=True):
            if isinstance(outcome, Unrenderable):
                self._drop(outcome, entry.entry_id, {"type": entry.type, "source": entry.source})
                owner.done.append(entry.entry_id)
            elif not _valid_tenant(outcome.tenant_id):
                self._drop(Unrenderable("malformed", "tenant id"), entry.entry_id, {"type": entry.type})
                owner.done.append(entry.entry_id)
            else:
                by_tenant.setdefault(outcome.tenant_id, []).append((owner, outcome))
        if not by_tenant:
            return 0
        endpoints = await self.endpoints.of(by_tenant)
        chunks: list[list[tuple[_Taken, RenderedEvent]]] = []
        commands: list[Command] = []
        for tenant_id, events in by_tenant.items():
            if tenant_id not in endpoints:
                continue  # its endpoints are unreadable now: its entries stay for a later round
            for start in range(0, len(events), EVENTS_PER_ROUTE):
                chunk = events[start : start + EVENTS_PER_ROUTE]
                chunks.append(chunk)
                commands.append(self.route_command(tenant_id, [event for _, event in chunk], endpoints[tenant_id]))
        replies = await send_together(self.redis, commands)
        now_ms = self.clock.now_ms()
        routed = 0
        for chunk, reply in zip(chunks, replies, strict=True):
            if isinstance(reply, Exception):
                tenant_id = chunk[0][1].tenant_id
                log.warning("events route failed", extra={"tenant_id": tenant_id, "error": error_text(reply)})
                continue
            for (owner, event), logged in zip(chunk, reply, strict=True):
                owner.done.append(event.entry_id)
                if int(logged):
                    routed += 1
                    self.counts.routed[event.type].inc()
                    self.counts.lag.observe(max(0, now_ms - event.at_ms) / 1000)
        return routed

    def route_command(
        self, tenant_id: str, events: Sequence[RenderedEvent], endpoints: Sequence[StoredEndpoint]
    ) -> Command:
        """route.lua for one tenant's events (all its keys in the tenant's slot)."""
        keys = TenantKeys(tenant_id)
        live = [e for e in endpoints if e.enabled]
        command_keys: list[KeyOrArg] = [keys.log, keys.ready, keys.endpoints]
        args: list[KeyOrArg] = [self.retention_ms, len(live)]
        for endpoint in live:
            command_keys += [keys.queue(endpoint.endpoint_id), keys.attempts(endpoint.endpoint_id)]
            args.append(endpoint.endpoint_id)
        for event in events:
            command_keys.append(keys.seen(event.event_id))
            wanted = "".join("1" if e.subscribes(event.type) else "0" for e in live)
            args += [event.event_id, event.type, event.at_ms, event.body, wanted]
        return Command.run(self._route_script, command_keys, args)

    async def _finish(self, taken: Sequence[_Taken]) -> None:
        """Removes each slot's done entries and gives its lease back."""
        if not taken:
            return
        commands = [
            Command.run(
                self._done_script,
                [event_keys.outbox_key(t.slot), event_keys.route_lease_key(t.slot)],
                [self._token, *t.done],
            )
            for t in taken
        ]
        for took, reply in zip(taken, await send_together(self.redis, commands), strict=True):
            if isinstance(reply, Exception):  # routed again next round (no-ops), the lease runs out
                log.warning("events outbox clean-up failed", extra={"slot": took.slot, "error": error_text(reply)})

    def _drop(self, exc: Unrenderable, entry_id: str, about: dict[str, str]) -> None:
        self.counts.dropped.labels(exc.reason).inc()
        self._dropped += 1
        log.warning(
            "events outbox entry dropped",
            extra={"reason": exc.reason, "detail": mask_numbers(str(exc)), "entry_id": entry_id}
            | {k: mask_numbers(v) for k, v in about.items()},
        )


@functools.lru_cache(maxsize=4096)
def _valid_tenant(tenant_id: str) -> bool:
    """A tenant id whose keys are the tenant's own slot (no braces, no colon): what producers write."""
    return TENANT_ID.pattern.fullmatch(tenant_id) is not None


def _pairs(fields: Any) -> dict[Any, Any]:
    """An XRANGE entry's fields as a mapping (redis-py gives a dict; a script's reply a flat list)."""
    if isinstance(fields, dict):
        return fields
    return dict(zip(fields[::2], fields[1::2], strict=True))
