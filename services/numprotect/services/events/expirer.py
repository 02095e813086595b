"""The expirer: binding.expired for bindings nobody touches (nothing is written when a binding expires).

binding_record_update.lua keeps, per slot, the expiries of the slot's committed, undeleted bindings
(event_keys.expiry_key) and its caller lowers the slot's score in an expiry ring to the new expiry (ZADD LT: the
ring holds, per slot, a time at or before the slot's earliest expiry). Every expiry poll the expirer reads the
slots due in the rings by Redis's clock (expiry_due_slots.lua), runs expire_due.lua in each (also by Redis's
clock: the outbox entries of the bindings expired, committed and undeleted, the zset cleaned), hints the router
(the outbox ring), and re-arms the ring with the slot's next expiry.

Re-arming without losing a producer's hint: expiry_rearm.lua moves the slot's score to its next expiry unless a
producer lowered it meanwhile; a producer that added an expiry after expire_due.lua read the zset but whose ZADD LT
did not lower the ring (its expiry later than the due score) is caught by reading the slot's earliest expiry again
after the re-arm and lowering the ring to it (ZADD LT). Every sweep interval the earliest expiry of every slot is
lowered into the rings the same way, so a hint lost with a crashed producer delays an expiry event by at most the
sweep interval. A binding expires into at most one event: expire_due.lua takes it off the zset in the same step.
"""

from __future__ import annotations

import logging
import time

from numprotect.core import event_keys
from numprotect.core.binding_records import binding_key
from numprotect.core.clock import Clock
from numprotect.core.metrics import Metrics
from numprotect.core.periodic import Periodic
from numprotect.core.redis_batch import Command, raise_first, send_together
from numprotect.core.redis_client import LuaScript, RedisClient, as_text
from numprotect.services.events.settings import EventsSettings
from numprotect.services.events.slot_sweep import error_text, sweep_slots

log = logging.getLogger(__name__)

# Bindings expire_due.lua looks at per call; a slot with more due is run again in the same round.
BINDINGS_PER_CALL = 500
# Calls per slot in one round before the rest waits for the next poll.
MAX_CALLS_PER_SLOT = 20
_RECORD_PREFIX, _RECORD_SUFFIX = binding_key("\0").split("\0")


class Expirer:
    """`metrics`: the events this records are counted where they are routed (numprotect_events_routed_total
    {type="binding.expired"}; numprotect_events_route_lag_seconds from the expiry instant)."""

    _due_slots = LuaScript.beside(__file__, "expiry_due_slots.lua")
    _expire_due = LuaScript.beside(__file__, "expire_due.lua")
    _rearm = LuaScript.beside(__file__, "expiry_rearm.lua")

    def __init__(self, redis: RedisClient, settings: EventsSettings, metrics: Metrics, clock: Clock) -> None:
        self.redis = redis
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self._next_sweep = 0.0
        self._scripts_loaded = False
        self._periodic = Periodic("events expirer", self.round, settings.expiry_poll_s)

    def start(self) -> None:
        self._periodic.start()

    async def close(self) -> None:
        await self._periodic.stop()

    async def round(self) -> int:
        """Expires what is due (after lowering every slot's ring score when a sweep is due); returns the bindings
        expired."""
        if time.monotonic() >= self._next_sweep:
            await self.sweep()
            self._next_sweep = time.monotonic() + self.settings.sweep_interval_s
        return await self.expire_due()

    async def expire_due(self) -> int:
        if not self._scripts_loaded:  # once up front, not NOSCRIPT for every slot of the first round
            for script in (self._due_slots, self._expire_due, self._rearm):
                await script.load(self.redis)
            self._scripts_loaded = True
        # Due by Redis's clock (expiry_due_slots.lua), the one expire_due.lua expires by: this process's clock may
        # lag it, and binding.expired would come that much later.
        commands = [
            Command.run(self._due_slots, [ring], [event_keys.SLOTS_PER_RING]) for ring in event_keys.expiry_ring_keys()
        ]
        now_ms = 0
        due: dict[int, int] = {}
        for reply in raise_first(await send_together(self.redis, commands)):
            now_ms = max(now_ms, int(reply[0]))
            for i in range(1, len(reply), 2):
                due[int(as_text(reply[i]))] = int(float(as_text(reply[i + 1])))
        if not due:
            return 0
        expired = 0
        slots = sorted(due)
        next_expiry: dict[int, int] = {}
        for _ in range(MAX_CALLS_PER_SLOT):
            commands = [self.expire_command(slot) for slot in slots]
            again = []
            hint = []
            for slot, reply in zip(slots, await send_together(self.redis, commands), strict=True):
                if isinstance(reply, Exception):
                    log.warning("binding expiry failed", extra={"slot": slot, "error": error_text(reply)})
                    next_expiry.pop(slot, None)
                    continue
                count, earliest = int(reply[0]), int(reply[1])
                expired += count
                next_expiry[slot] = earliest
                if count:
                    hint.append(slot)
                if count >= BINDINGS_PER_CALL and 0 <= earliest <= now_ms:
                    again.append(slot)
            if hint:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for slot in hint:
                        pipe.sadd(event_keys.ring_key(slot), slot)
                    await pipe.execute()
            slots = again
            if not slots:
                break
        await self._rearm_slots({slot: (due[slot], earliest) for slot, earliest in next_expiry.items()})
        return expired

    def expire_command(self, slot: int) -> Command:
        """expire_due.lua in `slot` (its reply: [bindings expired, the slot's next expiry or -1])."""
        return Command.run(
            self._expire_due,
            [event_keys.expiry_key(slot), event_keys.outbox_key(slot)],
            [_RECORD_PREFIX, _RECORD_SUFFIX, BINDINGS_PER_CALL],
        )

    async def _rearm_slots(self, slots: dict[int, tuple[int, int]]) -> None:
        """Moves each slot's ring score to its next expiry (slot -> (score found, next or -1)), then lowers it to
        the slot's earliest expiry read again (a producer's expiry the script did not see)."""
        if not slots:
            return
        order = sorted(slots)
        commands = [
            Command.run(self._rearm, [event_keys.expiry_ring_key(slot)], [slot, slots[slot][0], slots[slot][1]])
            for slot in order
        ]
        for slot, reply in zip(order, await send_together(self.redis, commands), strict=True):
            if isinstance(reply, Exception):
                log.warning("expiry ring re-arm failed", extra={"slot": slot, "error": error_text(reply)})
        await self._lower_rings(await sweep_slots(self.redis, "earliest", event_keys.expiry_key, order))

    async def sweep(self) -> None:
        """Lowers every slot's ring score to its earliest expiry (the hints a crashed producer did not write)."""
        await self._lower_rings(await sweep_slots(self.redis, "earliest", event_keys.expiry_key))

    async def _lower_rings(self, earliest: dict[int, int]) -> None:
        """ZADD LT each slot's earliest expiry into its ring (one command per ring)."""
        rings: dict[str, dict[str, int]] = {}
        for slot, score in earliest.items():
            rings.setdefault(event_keys.expiry_ring_key(slot), {})[str(slot)] = score
        if not rings:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for ring, members in rings.items():
                pipe.zadd(ring, members, lt=True)
            await pipe.execute()
