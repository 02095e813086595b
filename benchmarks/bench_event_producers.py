"""What recording events costs the writers (docs/redis-schema.md, "Events"): the CPU a CreateBinding and a CDR spend
on their outbox entries and hints, with and without events in the same run.

On one redis-server, in alternated rounds (the host is shared: each round hits both variants alike):
  - a create's completion step (binding store.complete: the record's commit mark and the routes, one round trip)
    with events (binding_record_update.lua given the slot's outbox and expiries: binding.created, the expiry entry,
    plus the ring and expiry-ring hints in the same pipeline) and without (the same script given the record alone,
    no hints): the only step of a CreateBinding that recording the event changes;
  - cdr's ingest script call for 1 record and for 100 records of a tenant (cdr.created per record, the ring hint)
    and without events (the same call for records of no tenant, which record none).
Over the clients the services use (binding: the write path's, multiplexing unless NUMPROTECT_REDIS_CLIENT=redis-py;
cdr: redis.asyncio). Per variant: this client's CPU (process_time: the binding or cdr service's side of the call) and
redis-server's (/proc) per operation; then the median over rounds of the paired difference (with - without, same round).
Run: python -m benchmarks.bench_event_producers (or make bench BENCH_ARGS=event_producers). Environment:
NUMPROTECT_BENCH_OPERATIONS (completions per round, default 3000), NUMPROTECT_BENCH_ROUNDS (default 6).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from benchmarks.harness import cpu_seconds, free_port, redis_server_args, wait_redis
from numprotect.cdr.v1 import cdr_pb2
from numprotect.core.binding_records import BindingRecord, BindingRecordStore, binding_key
from numprotect.core.cdr_keys import Bucket
from numprotect.core.limits import ConcurrencyLimit
from numprotect.core.redis_batch import Command, raise_first, send_together
from numprotect.core.redis_client import RedisClient, create_redis
from numprotect.core.routes import MODE_AXB, RouteTable
from numprotect.core.settings import Env, RedisSettings
from numprotect.services.binding.store import route_of
from numprotect.services.cdr.settings import CdrSettings
from numprotect.services.cdr.store import CdrStore
from numprotect.services.cdr.validation import ValidCdr

HOUR_MS = 3_600_000
CDR_SIZES = (1, 100)
VARIANTS = ("with events", "without")
# (client CPU s, Redis CPU s) per operation, one per round.
Samples = list[tuple[float, float]]


class Producers:
    """The writes measured, over one client of the benchmark's redis-server."""

    def __init__(self, write_path: RedisClient, redis: RedisClient, now_ms: int) -> None:
        """`write_path`: binding's client (the multiplexing one by default); `redis`: cdr's (redis.asyncio)."""
        self.redis = write_path
        self.now_ms = now_ms
        self.records = BindingRecordStore(write_path)
        self.routes = RouteTable(write_path)
        self.cdrs = CdrStore(redis, CdrSettings.from_env(Env({})), ConcurrencyLimit(8, wait_seconds=1, name="bench"))
        self.made = 0

    async def pending(self, count: int) -> list[BindingRecord]:
        """`count` pending records, as a create's write step leaves them (not measured)."""
        records = []
        for _ in range(count):
            self.made += 1
            i = self.made
            record = BindingRecord(
                f"bench{i:012d}", "t1", f"o{i}", MODE_AXB, "13800000001", f"139{i % 10**8:08d}",
                f"7002{i % 10**7:07d}0", "", "010", 0, False, False, True, self.now_ms, self.now_ms + HOUR_MS,
                self.now_ms, 0,
            )  # fmt: skip
            await self.records.create(record, reservation_id="r", city_fallback=False, keep_until_ms=record.expire_ms)
            records.append(record)
        return records

    async def complete(self, record: BindingRecord, events: bool) -> None:
        """store.complete's round trip: the commit mark (with its events and hints, or the record alone) and the
        routes."""
        if events:
            commands = self.records.activate_commands(record.binding_id, record.end_ms(), expire_ms=record.expire_ms)
        else:
            retention = record.end_ms() + self.records.retention_ms
            commands = [
                Command.run(self.records._update, [binding_key(record.binding_id)], [retention, "", "", "st", "a"])
            ]
        commands.append(self.routes.put_command(record.virtual_number, route_of(record), ""))
        raise_first(await send_together(self.redis, commands))

    async def ingest(self, size: int, events: bool) -> None:
        """One ingest script call of `size` new records: a tenant's (events) or of no tenant (none)."""
        self.made += 1
        records = [self._cdr(f"c{self.made}-{j}") for j in range(size)]
        await self.cdrs._ingest_chunk(Bucket("t1" if events else ""), records, self.now_ms)

    def _cdr(self, call_id: str) -> ValidCdr:
        call_ms = self.now_ms - 60_000
        record = cdr_pb2.CallDetailRecord(
            call_id=call_id,
            calling_number="13800000001",
            called_number="700100000000001",
            target_number="13900000002",
            call_type=cdr_pb2.CALL_TYPE_PEER_TO_A,
            release_direction=cdr_pb2.RELEASE_DIRECTION_CALLER,
            release_cause=16,
            carrier_id="cmcc",
            tenant_id="t1",
            binding_id="b00000000000000000000001",
        )
        record.call_time.FromMilliseconds(call_ms)
        record.release_time.FromMilliseconds(call_ms + 10_000)
        return ValidCdr(0, record, call_ms, False, 0, None)


async def measured(redis_pid: int, count: int, operation: Callable[[], Awaitable[None]]) -> tuple[float, float]:
    client, server = time.process_time(), cpu_seconds(redis_pid)
    for _ in range(count):
        await operation()
    return (time.process_time() - client) / count, (cpu_seconds(redis_pid) - server) / count


async def bench(redis_url: str, redis_pid: int) -> None:
    operations = int(os.environ.get("NUMPROTECT_BENCH_OPERATIONS", "3000"))
    rounds = int(os.environ.get("NUMPROTECT_BENCH_ROUNDS", "6"))
    settings = RedisSettings.from_env(Env({"NUMPROTECT_REDIS_URL": redis_url}))
    # The clients the services use: binding's write path (create_redis(write_path=True)), cdr's runtime client.
    write_path, redis = create_redis(settings, write_path=True), create_redis(settings)
    producers = Producers(write_path, redis, int(time.time() * 1000))
    samples: dict[tuple[str, str], Samples] = {}
    try:
        for events in (True, False):  # warm: scripts loaded, connections open
            for record in await producers.pending(50):
                await producers.complete(record, events)
            await producers.ingest(1, events)
        for number in range(rounds):
            order = VARIANTS if number % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                events = variant == VARIANTS[0]
                queue = iter(await producers.pending(operations))

                def complete(queue: Iterator[BindingRecord] = queue, events: bool = events) -> Awaitable[None]:
                    return producers.complete(next(queue), events)

                samples.setdefault(("create completion", variant), []).append(
                    await measured(redis_pid, operations, complete)
                )
                for size in CDR_SIZES:

                    def ingest(size: int = size, events: bool = events) -> Awaitable[None]:
                        return producers.ingest(size, events)

                    samples.setdefault((f"ingest of {size} CDR(s)", variant), []).append(
                        await measured(redis_pid, max(20, operations // size), ingest)
                    )
        report(samples, operations, rounds)
    finally:
        await write_path.aclose()
        await redis.aclose()


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def report(samples: dict[tuple[str, str], Samples], operations: int, rounds: int) -> None:
    print(
        f"{rounds} alternated rounds, {operations} create completions per round and variant; CPU per operation in us "
        f"(client: process_time; Redis: /proc); load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print(f"  {'operation':24s} {'variant':12s} {'client':>8s} {'Redis':>8s}   (medians over rounds)")
    names = list(dict.fromkeys(name for name, _ in samples))
    for name in names:
        for variant in VARIANTS:
            values = samples[(name, variant)]
            client = _median([c for c, _ in values]) * 1e6
            server = _median([s for _, s in values]) * 1e6
            print(f"  {name:24s} {variant:12s} {client:8.1f} {server:8.1f}")
    print("added by recording the events (median of the paired differences, with - without, same round):")
    for name in names:
        pairs = list(zip(samples[(name, VARIANTS[0])], samples[(name, VARIANTS[1])], strict=True))
        client = _median([(w[0] - o[0]) * 1e6 for w, o in pairs])
        server = _median([(w[1] - o[1]) * 1e6 for w, o in pairs])
        size = int(name.split()[2]) if name.startswith("ingest") else 1
        per = f"; per CDR {client / size:+.1f} / {server / size:+.1f}" if size > 1 else ""
        print(f"  {name:24s} client {client:+8.1f} us  Redis {server:+8.1f} us{per}")
    print("  (a CreateBinding's other steps are the same with and without events: its added CPU is the completion's)")


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="np-bench-events-"))
    port = free_port()
    server = subprocess.Popen(
        redis_server_args("redis-server", port, workdir, "--appendonly", "no"), stdout=subprocess.DEVNULL
    )
    try:
        wait_redis(port, timeout=20).close()
        asyncio.run(bench(f"redis://127.0.0.1:{port}/0", server.pid))
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
