"""What the producers of events (binding, allocation, cdr) send beside a script that records events in the outbox of
its slot (numprotect.core.event_keys; docs/redis-schema.md, "Events"): the hints that tell the events service where
to look, in the same round trip as the script.

A hint is a write to another slot (a ring shard), so it cannot be in the script; it is sent together with it
(redis_batch.send_together: one round trip, on a cluster one pipeline per node side by side). A hint that fails is
only logged: the event is in the outbox already, and the events service's sweep finds it without the hint.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from numprotect.core import event_keys
from numprotect.core.redis_batch import Command, send_together
from numprotect.core.redis_client import RedisClient

log = logging.getLogger(__name__)


def warm() -> None:
    """Computes the slots' hash tags now (~0.2 s, once per process), at start-up rather than in a call."""
    event_keys.slot_tag(0)


def ring_hint(key: str) -> Command:
    """The slot of `key` (whose script wrote to the outbox beside it) added to its ring: drain me."""
    slot = event_keys.key_slot(key)
    return Command.of("SADD", event_keys.ring_key(slot), slot)


def expiry_ring_hint(key: str, expire_ms: int) -> Command:
    """The slot of `key` in its expiry ring at `expire_ms`, unless the ring has it earlier (ZADD LT)."""
    slot = event_keys.key_slot(key)
    return Command.of("ZADD", event_keys.expiry_ring_key(slot), "LT", expire_ms, slot)


def first_reply(replies: Sequence[Any]) -> Any:
    """The reply of the command sent first (the script), raised if it is an error; the hints' errors that follow it
    are logged."""
    if isinstance(replies[0], Exception):
        raise replies[0]
    for reply in replies[1:]:
        if isinstance(reply, Exception):
            log.debug("an events hint failed; the events sweep finds the event", extra={"error": repr(reply)})
    return replies[0]


async def run_with_hints(redis: RedisClient, command: Command, hints: Sequence[Command]) -> Any:
    """`command`'s reply, sent in one round trip with `hints`."""
    return first_reply(await send_together(redis, [command, *hints]))
