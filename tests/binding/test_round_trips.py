"""Redis commands and sequential round trips per CreateBinding, UpdateBinding (each kind) and DeleteBinding.

Commands are counted on the wire, with MONITOR on every primary (as tests/translation/test_round_trips.py does), and
attributed to binding by the keys they name (binding's key families; allocation's are np:alloc:*). Sequential round
trips are counted at the binding service's own Redis client: a round trip starts whenever the client goes from idle
to waiting (commands sent together, in one pipeline or side by side, are one round trip). docs/binding.md, "Redis
round trips", states the figures asserted here and why each round trip is needed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import field_mask_pb2, timestamp_pb2
from google.protobuf.duration_pb2 import Duration
from translation.test_round_trips import Monitor, _primaries

from numprotect.binding.v1 import binding_pb2 as pb
from numprotect.common.v1 import common_pb2

A = "13800000001"
CALLS = 3  # of each kind: every call of a kind must cost the same
# Binding's key families (services/binding/store.py, numprotect.core.binding_records and routes).
BINDING_KEYS = ("np:ord:", "np:b:", "np:rt:", "np:nh:", "np:tl:")
# The events' hints (numprotect.core.event_outbox), sent beside the record's script: counted apart.
EVENT_KEYS = "np:ev:"
# One create in 64 also trims its tenant index shard (store.TenantIndex), in the same round trip.
TRIM = "ZREMRANGEBYLEX"


def _words(line: str) -> list[str]:
    return [word for i, word in enumerate(line.split("] ", 1)[1].split('"')) if i % 2 == 1]


def _first_key(words: list[str]) -> str:
    if words[0].upper() in ("EVALSHA", "EVAL"):
        return words[3] if int(words[2]) > 0 else ""
    return words[1] if len(words) > 1 else ""


@dataclass
class RoundTrips:
    """Counts the round trips of one redis.asyncio client (standalone or cluster): the times it went from idle to
    waiting for Redis, over its commands and its pipelines."""

    waiting: int = 0
    started: int = 0
    per_call: list[int] = field(default_factory=list)

    def watch(self, client: Any) -> None:
        execute_command, pipeline = client.execute_command, client.pipeline

        async def counted_command(*args: Any, **kwargs: Any) -> Any:
            return await self._counted(execute_command(*args, **kwargs))

        def counted_pipeline(*args: Any, **kwargs: Any) -> Any:
            pipe = pipeline(*args, **kwargs)
            execute = pipe.execute

            async def counted_execute(*a: Any, **k: Any) -> Any:
                return await self._counted(execute(*a, **k))

            pipe.execute = counted_execute
            return pipe

        client.execute_command = counted_command
        client.pipeline = counted_pipeline

    async def _counted(self, reply: Awaitable[Any]) -> Any:
        if self.waiting == 0:
            self.started += 1
        self.waiting += 1
        try:
            return await reply
        finally:
            self.waiting -= 1

    async def of(self, call: Awaitable[Any]) -> Any:
        before = self.started
        result = await call
        self.per_call.append(self.started - before)
        return result


@dataclass(frozen=True)
class Cost:
    """What one call of a kind cost binding: Redis commands by name, and sequential round trips."""

    commands: dict[str, int]
    round_trips: int
    event_hints: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.commands.values())


async def measure(
    s: Any, redis_sync: Any, trips: RoundTrips, calls: list[Callable[[], Awaitable[Any]]]
) -> tuple[Cost, int]:
    """The cost of each of `calls` (asserted equal for all of them) and how many tenant index trims they made."""
    primaries = _primaries(redis_sync)
    monitors = [Monitor(host, port) for host, port in primaries]
    for monitor in monitors:
        await monitor.started()
    trips.per_call.clear()
    for call in calls:
        await trips.of(call())
    # Commands clients sent (those scripts ran show as "[0 lua]").
    lines = [line for monitor in monitors for line in await monitor.stop_after_all_so_far()]
    sent = [_words(line) for line in lines if " lua]" not in line]
    by_binding = [w for w in sent if _first_key(w).startswith(BINDING_KEYS) or w[0].upper() == "SCRIPT"]
    names = Counter(w[0].upper() for w in by_binding)
    hints = Counter(w[0].upper() for w in sent if _first_key(w).startswith(EVENT_KEYS))
    trims = names.pop(TRIM, 0)
    assert all(count % len(calls) == 0 for count in [*names.values(), *hints.values()]), (names, hints)
    assert len(set(trips.per_call)) == 1, trips.per_call
    per_call = {name: count // len(calls) for name, count in names.items()}
    return Cost(per_call, trips.per_call[0], {name: count // len(calls) for name, count in hints.items()}), trims


def _mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


def _at(ms: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


async def test_redis_commands_and_round_trips_per_call(services: Any, redis_sync: Any) -> None:
    async with services(NUMPROTECT_BINDING_RECOVERY_INTERVAL="600s") as s:
        trips = RoundTrips()
        trips.watch(s.binding_service.app.registrations[0].servicer.creator.store.redis)
        counter = iter(range(1_000_000))

        async def create() -> pb.Binding:
            i = next(counter)
            request = pb.CreateBindingRequest(
                tenant_id="t1",
                out_order_id=f"rt-{i}",
                mode=common_pb2.BINDING_MODE_AXB,
                party_a=A,
                party_b=f"139{i:08d}",
                city_code="010",
                ttl=Duration(seconds=3600),
                user_consent=True,
            )
            reply: pb.CreateBindingResponse = await s.binding.CreateBinding(request)
            return reply.binding

        async def update(binding: pb.Binding, paths: tuple[str, ...]) -> Any:
            request = pb.UpdateBindingRequest(binding=binding, update_mask=_mask(*paths))
            return await s.binding.UpdateBinding(request)

        def updates(bindings: list[pb.Binding], kind: str) -> list[Callable[[], Awaitable[Any]]]:
            def one(b: pb.Binding, i: int) -> Callable[[], Awaitable[Any]]:
                expire_ms = b.expire_time.ToMilliseconds()
                change = {
                    "restrictions": (
                        pb.Binding(
                            binding_id=b.binding_id,
                            tenant_id="t1",
                            call_restriction=common_pb2.CALL_RESTRICTION_A_TO_B_ONLY,
                            recording_enabled=True,
                        ),
                        ("call_restriction", "recording_enabled"),
                    ),
                    "party_b": (
                        pb.Binding(binding_id=b.binding_id, tenant_id="t1", party_b=f"137{i:08d}"),
                        ("party_b",),
                    ),
                    "ttl later": (
                        pb.Binding(binding_id=b.binding_id, tenant_id="t1", expire_time=_at(expire_ms + 600_000)),
                        ("expire_time",),
                    ),
                    "ttl earlier": (
                        pb.Binding(binding_id=b.binding_id, tenant_id="t1", expire_time=_at(expire_ms - 600_000)),
                        ("expire_time",),
                    ),
                }[kind]
                return lambda: update(*change)

            return [one(b, i) for i, b in enumerate(bindings)]

        # Warm: connections open, every script loaded, the cluster client's slot map read.
        warm = [await create() for _ in range(2)]
        for kind in ("restrictions", "party_b", "ttl later", "ttl earlier"):
            await updates(warm, kind)[0]()
        await s.binding.DeleteBinding(pb.DeleteBindingRequest(binding_id=warm[0].binding_id, tenant_id="t1"))

        costs: dict[str, Cost] = {}
        created: list[pb.Binding] = []

        async def create_one() -> None:
            created.append(await create())

        costs["CreateBinding"], trims = await measure(s, redis_sync, trips, [create_one] * CALLS)
        assert trims <= CALLS
        for kind in ("restrictions", "party_b", "ttl later", "ttl earlier"):
            costs[f"UpdateBinding {kind}"], _ = await measure(s, redis_sync, trips, updates(created, kind))

        def delete(b: pb.Binding) -> Callable[[], Awaitable[Any]]:
            return lambda: s.binding.DeleteBinding(pb.DeleteBindingRequest(binding_id=b.binding_id, tenant_id="t1"))

        costs["DeleteBinding"], _ = await measure(s, redis_sync, trips, [delete(b) for b in created])
        for name, cost in costs.items():
            print(
                f"{name:28s} {cost.total:2d} commands in {cost.round_trips} round trips: {dict(cost.commands)}"
                f", events' hints {cost.event_hints}"
            )
        assert {name: (cost.total, cost.round_trips) for name, cost in costs.items()} == EXPECTED
        assert {name: cost.event_hints for name, cost in costs.items()} == EXPECTED_EVENT_HINTS


# (commands, sequential round trips) per call; docs/binding.md, "Redis round trips", says why each is needed.
EXPECTED: dict[str, tuple[int, int]] = {
    "CreateBinding": (9, 5),
    "UpdateBinding restrictions": (4, 4),
    "UpdateBinding party_b": (5, 5),
    "UpdateBinding ttl later": (6, 5),
    "UpdateBinding ttl earlier": (4, 4),
    "DeleteBinding": (3, 3),
}
# Commands per call on the events' keys: the hints sent in the same round trips as the record's script (the slot in
# its ring; the expiry ring when the binding's expiry is written), docs/redis-schema.md "Events".
EXPECTED_EVENT_HINTS: dict[str, dict[str, int]] = {
    "CreateBinding": {"SADD": 1, "ZADD": 1},
    "UpdateBinding restrictions": {"SADD": 1},
    "UpdateBinding party_b": {"SADD": 1},
    "UpdateBinding ttl later": {"SADD": 1, "ZADD": 1},
    "UpdateBinding ttl earlier": {"SADD": 1, "ZADD": 1},
    "DeleteBinding": {"SADD": 1},
}
