"""Binding benchmark: the write path (create, update, delete) against the health-check ceiling, the Redis commands
each call sends, and Redis memory per live AXB binding.

Starts a redis-server, the allocation and the binding service as processes (one each), imports number blocks,
then, with the same client concurrency against the same binding server:
  1. interleaved rounds (the machine is shared and its load changes: each round hits every phase alike) of
     Health/Check (the ceiling of this server, client and machine: no work behind it), CreateBinding (AXB, distinct
     parties and orders), UpdateBinding of the bindings created (three kinds: expire_time +10 min, party_b, which
     allocation's ReplaceParty swaps, and call_restriction) and DeleteBinding; per phase: calls/s, p50/p99,
     errors by code and the CPU per call of the binding server, the allocation server and Redis (/proc, INFO cpu);
  2. issue 17's targets, each with PASS/FAIL: the CPU per create, update and delete summed over the three
     processes, in units of the binding server's CPU per Health/Check (<= 4), and creates/s / Health/Check/s (>= 0.35);
  3. MONITOR_CALLS sequential calls of each RPC under MONITOR: Redis commands per call sent by each service (its
     connections' ports among its sockets in /proc) and the command mix, plus Redis's socket reads per call;
  4. more creations until MEMORY_TARGET live bindings exist (or MEMORY_BUDGET_SECONDS pass), then the used_memory
     growth over the create phases (updates and deletes change memory too, so only the creates' windows count) per
     binding created, with a per-key-family breakdown (MEMORY USAGE).
Plaintext with no identity checks by default (the services' own work); NUMPROTECT_BENCH_SECURED=1 runs them as
deployed, TLS and a token checked on every call (binding_stack.py).
Run: python -m benchmarks.bench_binding  (or make bench BENCH_ARGS=binding). Environment overrides:
NUMPROTECT_BENCH_CONCURRENCY, NUMPROTECT_BENCH_MEMORY_TARGET, NUMPROTECT_BENCH_MEMORY_BUDGET,
NUMPROTECT_BENCH_SECURED.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import redis
from google.protobuf.field_mask_pb2 import FieldMask
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.binding_stack import PLAINTEXT, Stack, run_stack
from benchmarks.load import CpuMeter, Exhausted, Outcome, run_for
from benchmarks.redis_monitor import Monitor, Tally, connection_owners, script_names, tally
from numprotect.allocation.v1 import allocation_pb2, allocation_pb2_grpc
from numprotect.binding.v1 import binding_pb2, binding_pb2_grpc
from numprotect.common.v1 import common_pb2
from numprotect.core.identity.principal import Role

TENANT = "bench"
CITY = "010"
BLOCKS = ("70020000000", "70020000001", "70020000002")
HEALTH_SECONDS = 6.0
CREATE_SECONDS = 12.0
UPDATE_SECONDS = 6.0  # each kind
DELETE_SECONDS = 6.0
ROUNDS = 3
CHANNELS = 4
MONITOR_CALLS = 50
QUIET_SECONDS = 6.0  # longer than the services' periodic work (health probe 1 s, pending creates 5 s)
EXPIRY_STEP_MS = 600_000
# Issue 17's targets.
CPU_TARGET = 4.0  # CPU per call, binding + allocation + Redis, over the binding server's CPU per Health/Check
RATE_TARGET = 0.35  # creates/s over Health/Check/s of the same binding server
SERVICES = ("binding", "allocation")


@dataclass(frozen=True)
class Phase:
    key: str
    rpc: str  # as the CPU, target and MONITOR lines name it
    seconds: float
    rate: str  # the rate line's words: "<rate> (<what>, 12s in 3 rounds)"
    what: str = "AXB"


PHASES = (
    Phase("health", "Health/Check", HEALTH_SECONDS, "health checks/s", "binding server"),
    Phase("create", "CreateBinding", CREATE_SECONDS, "binding creations/s"),
    Phase("expire_time", "UpdateBinding expire_time", UPDATE_SECONDS, "binding updates/s, expire_time +10 min"),
    Phase("party_b", "UpdateBinding party_b", UPDATE_SECONDS, "binding updates/s, party_b via ReplaceParty"),
    Phase("call_restriction", "UpdateBinding call_restriction", UPDATE_SECONDS, "binding updates/s, call_restriction"),
    Phase("delete", "DeleteBinding", DELETE_SECONDS, "binding deletions/s"),
)


@dataclass
class LiveBinding:
    """A binding the bench created, as far as its own successful calls changed it."""

    binding_id: str
    expire_ms: int
    call_restriction: int = common_pb2.CALL_RESTRICTION_NONE


class Workload:
    """One call of each phase; creates feed a queue of live bindings that updates borrow (one call per binding at a
    time: the service locks a binding per update) and deletes take away."""

    def __init__(self, channels: list[grpc.aio.Channel]) -> None:
        self.health: list[Any] = [health_pb2_grpc.HealthStub(c) for c in channels]
        self.stubs: list[Any] = [binding_pb2_grpc.BindingServiceStub(c) for c in channels]
        self.live: deque[LiveBinding] = deque()
        self.orders = 0
        self.parties = 0

    def call(self, key: str) -> Callable[[int], Awaitable[None]]:
        if key == "health":
            return self.check
        if key == "create":
            return self.create
        if key == "delete":
            return self.delete
        return lambda i: self.update(key, i)

    async def check(self, i: int) -> None:
        await self.health[i % CHANNELS].Check(health_pb2.HealthCheckRequest(), timeout=10)

    async def create(self, i: int) -> None:
        n, self.orders = self.orders, self.orders + 1
        request = binding_pb2.CreateBindingRequest(
            tenant_id=TENANT,
            out_order_id=f"order-{n}",
            mode=common_pb2.BINDING_MODE_AXB,
            party_a=f"138{n:08d}",
            party_b=f"139{n:08d}",
            city_code=CITY,
            user_consent=True,
        )
        response = await self.stubs[i % CHANNELS].CreateBinding(request, timeout=30)
        self.live.append(LiveBinding(response.binding.binding_id, response.binding.expire_time.ToMilliseconds()))

    async def update(self, kind: str, i: int) -> None:
        if not self.live:
            raise Exhausted
        binding = self.live.popleft()
        try:
            message = binding_pb2.Binding(binding_id=binding.binding_id, tenant_id=TENANT)
            if kind == "expire_time":
                message.expire_time.FromMilliseconds(binding.expire_ms + EXPIRY_STEP_MS)
            elif kind == "party_b":
                message.party_b = f"137{self.parties:08d}"  # never used before: allocation takes it on this X
                self.parties += 1
            else:
                message.call_restriction = (
                    common_pb2.CALL_RESTRICTION_A_TO_B_ONLY
                    if binding.call_restriction == common_pb2.CALL_RESTRICTION_NONE
                    else common_pb2.CALL_RESTRICTION_NONE
                )
            request = binding_pb2.UpdateBindingRequest(binding=message, update_mask=FieldMask(paths=[kind]))
            response = await self.stubs[i % CHANNELS].UpdateBinding(request, timeout=30)
            binding.expire_ms = response.binding.expire_time.ToMilliseconds()
            binding.call_restriction = response.binding.call_restriction
        finally:
            self.live.append(binding)

    async def delete(self, i: int) -> None:
        if not self.live:
            raise Exhausted
        binding = self.live.popleft()
        request = binding_pb2.DeleteBindingRequest(binding_id=binding.binding_id, tenant_id=TENANT)
        await self.stubs[i % CHANNELS].DeleteBinding(request, timeout=30)


def key_family(key: bytes) -> str:
    text = key.decode()
    for prefix, name in (
        ("np:b:", "binding record np:b"),
        ("np:rt:", "routes np:rt"),
        ("np:nh:", "number history np:nh"),
        ("np:ord:", "order keys np:ord"),
        ("np:tl:", "tenant index np:tl"),
        ("np:alloc:", "allocation np:alloc"),
    ):
        if text.startswith(prefix):
            return name
    return "other"


def memory_by_family(client: redis.Redis) -> dict[str, tuple[int, int]]:
    """(keys, MEMORY USAGE bytes) per key family, over every key."""
    totals: dict[str, list[int]] = {}
    batch: list[bytes] = []

    def flush() -> None:
        pipe = client.pipeline(transaction=False)
        for key in batch:
            pipe.memory_usage(key, samples=0)
        for key, used in zip(batch, pipe.execute(), strict=True):
            family = totals.setdefault(key_family(key), [0, 0])
            family[0] += 1
            family[1] += int(used or 0)
        batch.clear()

    for key in client.scan_iter(count=5000):
        batch.append(key)
        if len(batch) >= 2000:
            flush()
    if batch:
        flush()
    return {name: (v[0], v[1]) for name, v in totals.items()}


@dataclass
class MemoryLedger:
    """Redis memory growth summed over the windows in which only creates ran, and the bindings they created."""

    client: redis.Redis
    used: int = 0
    families: dict[str, list[int]] = field(default_factory=dict)
    bindings: int = 0

    def snapshot(self) -> tuple[int, dict[str, tuple[int, int]]]:
        return int(self.client.info("memory")["used_memory"]), memory_by_family(self.client)

    def add(self, before: tuple[int, dict[str, tuple[int, int]]], created: int) -> None:
        used, families = self.snapshot()
        self.used += used - before[0]
        self.bindings += created
        for name in families.keys() | before[1].keys():
            keys, size = families.get(name, (0, 0))
            base_keys, base_size = before[1].get(name, (0, 0))
            total = self.families.setdefault(name, [0, 0])
            total[0] += keys - base_keys
            total[1] += size - base_size


@dataclass
class Results:
    """Per phase: the outcome and seconds over all rounds, and each round's calls/s."""

    outcomes: dict[str, Outcome] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    round_rates: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, outcome: Outcome, elapsed: float) -> None:
        self.outcomes.setdefault(key, Outcome()).add(outcome)
        self.seconds[key] = self.seconds.get(key, 0.0) + elapsed
        self.round_rates.setdefault(key, []).append(outcome.ok / elapsed)

    def rate(self, key: str) -> float:
        return self.outcomes[key].ok / self.seconds[key]


def pass_fail(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def report_rounds(results: Results, meter: CpuMeter, concurrency: int, security: str) -> None:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"client concurrency {concurrency} over {CHANNELS} channels; 1 binding + 1 allocation process; "
        f"{os.cpu_count()} CPUs shared by Redis, both services and this client; load average {load}"
    )
    if security != PLAINTEXT:
        print(f"security: {security}")
    health = results.outcomes["health"]
    print(
        f"health checks/s (binding server, {HEALTH_SECONDS:g}s in {ROUNDS} rounds): {results.rate('health'):,.0f}  "
        f"p50 {health.percentile_ms(0.5):.2f} ms"
    )
    for phase in PHASES[1:]:
        outcome = results.outcomes[phase.key]
        print(
            f"{phase.rate} ({phase.what}, {phase.seconds:g}s in {ROUNDS} rounds): {results.rate(phase.key):,.0f}  "
            f"p50 {outcome.percentile_ms(0.5):.2f} ms  p99 {outcome.percentile_ms(0.99):.2f} ms  "
            f"errors {outcome.errors or 0}"
        )
        for code, details in outcome.first_error.items():
            print(f"  first {code}: {details}")
    print(f"ratio creations / health-check ceiling: {results.rate('create') / results.rate('health'):.3f}")
    # CPU per call does not depend on how busy the shared machine is: the capacity ratio it implies is the
    # load-independent figure (a create needs the binding server's CPU plus allocation's and Redis's).
    per_call = {p.key: meter.per_call(p.key, results.outcomes[p.key].ok) for p in PHASES}
    b_health = per_call["health"]["binding"]
    create = per_call["create"]
    print(
        f"CPU per health check (binding server): {b_health * 1e6:,.0f} us; per create: binding server "
        f"{create['binding'] * 1e6:,.0f} us, allocation server {create['allocation'] * 1e6:,.0f} us, "
        f"Redis {create['Redis'] * 1e6:,.0f} us"
    )
    print(
        f"CPU-bound ratio on the binding server (health CPU / create CPU): {b_health / create['binding']:.3f}; "
        f"whole create path (binding + allocation + Redis, one core each): {b_health / max(create.values()):.3f}"
    )
    per_round = "; ".join(
        f"{h:,.0f}, {c:,.0f}, {c / h:.3f}"
        for h, c in zip(results.round_rates["health"], results.round_rates["create"], strict=True)
    )
    print(f"  per round (health/s, creations/s, ratio): {per_round}")
    others = [p.key for p in PHASES[2:]]
    per_round = "; ".join(
        ", ".join(f"{rates[i]:,.0f}" for rates in (results.round_rates[k] for k in others)) for i in range(ROUNDS)
    )
    print(f"  per round ({', '.join(others)} calls/s): {per_round}")

    print("\nCPU per call (us; /proc for the services, INFO cpu for Redis), and the sum in Health/Check units:")
    print(f"  {'call':32s} {'binding':>8s} {'allocation':>10s} {'Redis':>7s} {'sum':>7s} {'sum/health':>10s}")
    for phase in PHASES:
        cpu = per_call[phase.key]
        total = sum(cpu.values())
        print(
            f"  {phase.rpc:32s} {cpu['binding'] * 1e6:8,.0f} {cpu['allocation'] * 1e6:10,.0f} "
            f"{cpu['Redis'] * 1e6:7,.0f} {total * 1e6:7,.0f} {total / b_health:10.1f}"
        )

    print("\nissue 17 targets (this run):")
    for phase in PHASES[1:]:
        ratio = sum(per_call[phase.key].values()) / b_health
        print(
            f"  {phase.rpc} CPU (binding + allocation + Redis) / binding's CPU per Health/Check: {ratio:.1f} "
            f"(target <= {CPU_TARGET:g}): {pass_fail(ratio <= CPU_TARGET)}"
        )
    ratio = results.rate("create") / results.rate("health")
    print(f"  creates/s / Health/Check/s: {ratio:.3f} (target >= {RATE_TARGET:g}): {pass_fail(ratio >= RATE_TARGET)}")


def total_reads(client: redis.Redis) -> int:
    """Socket reads Redis has processed (a request, or a pipeline sent at once, is one read on loopback)."""
    return int(client.info("stats")["total_reads_processed"])


@dataclass
class WireCount:
    """Redis commands per call of one RPC, by sending service."""

    rpc: str
    calls: int  # successful ones
    tallies: dict[str, Tally]
    reads: int
    seconds: float
    errors: dict[str, int] = field(default_factory=dict)


async def count_on_the_wire(workload: Workload, stack: Stack) -> tuple[list[WireCount], WireCount]:
    """MONITOR_CALLS sequential calls of each RPC under MONITOR; and a quiet window: what the services send anyway."""
    monitor = Monitor("127.0.0.1", stack.redis_port)
    scripts = script_names()
    watched = {**stack.pids, "bench": os.getpid()}

    async def watch(rpc: str, call: Callable[[int], Awaitable[None]], calls: int) -> WireCount:
        monitor.start()
        await asyncio.sleep(0.2)
        reads = total_reads(stack.redis)
        started = time.perf_counter()
        outcome, _ = await run_for(None, 1, call, limit=calls)
        elapsed = time.perf_counter() - started
        reads = total_reads(stack.redis) - reads - 1  # less this INFO's own read
        await asyncio.sleep(0.2)
        commands = monitor.stop()
        owners = connection_owners(stack.redis_port, watched)
        return WireCount(rpc, outcome.ok, tally(commands, owners, scripts), reads, elapsed, outcome.errors)

    counts = [await watch(phase.rpc, workload.call(phase.key), MONITOR_CALLS) for phase in PHASES]

    async def idle(i: int) -> None:
        await asyncio.sleep(QUIET_SECONDS)

    quiet = await watch("no calls", idle, 1)
    return counts, quiet


def report_wire(counts: list[WireCount], quiet: WireCount) -> None:
    print(
        f"\nRedis commands per call on the wire (MONITOR, {MONITOR_CALLS} sequential calls each): per service, "
        "commands sent / round trips (requests: commands one connection sent together count once; commands sent "
        "at once on two connections count twice) [commands run inside its scripts]; Redis's socket reads per call "
        "(INFO stats, every client) to check the round trips against:"
    )
    for count in counts:
        if count.errors:
            print(f"  {count.rpc:32s} errors under MONITOR: {count.errors} (per call below: {count.calls} that worked)")
        if not count.calls:
            continue
        shown = [name for name in count.tallies if name != "bench"]
        shown.sort(key=lambda name: (name not in SERVICES, SERVICES.index(name) if name in SERVICES else 0, name))
        parts = []
        for name in shown:
            counts_of = count.tallies[name]
            parts.append(
                f"{name} {sum(counts_of.sent.values()) / count.calls:.2f} / {counts_of.round_trips / count.calls:.2f} "
                f"[{counts_of.inside_scripts / count.calls:.1f}]"
            )
        print(f"  {count.rpc:32s} {', '.join(parts) or 'none'}; socket reads {count.reads / count.calls:.2f}")
        for name in shown:
            mix = ", ".join(f"{kind} {n / count.calls:.2f}" for kind, n in sorted(count.tallies[name].sent.items()))
            print(f"      {name}: {mix}")
    background = ", ".join(
        f"{name} " + ", ".join(f"{kind} {n / quiet.seconds:.1f}/s" for kind, n in sorted(counts_of.sent.items()))
        for name, counts_of in sorted(quiet.tallies.items())
        if name != "bench"
    )
    print(
        f"  with no calls for {quiet.seconds:.0f} s (included above at this rate; probes, pending-create checks): "
        f"{background or 'nothing'}"
    )


async def import_blocks(stack: Stack) -> None:
    async with stack.channel(stack.allocation_address, Role.OPERATOR) as channel:
        allocation: Any = allocation_pb2_grpc.AllocationServiceStub(channel)
        for block in BLOCKS:
            await allocation.ImportBlock(
                allocation_pb2.ImportBlockRequest(
                    block=block, tenant_id=TENANT, city_code=CITY, actor="bench", carrier_id="bench-carrier"
                )
            )


async def bench(stack: Stack) -> None:
    concurrency = int(os.environ.get("NUMPROTECT_BENCH_CONCURRENCY", "64"))
    memory_target = int(os.environ.get("NUMPROTECT_BENCH_MEMORY_TARGET", "100000"))
    memory_budget = float(os.environ.get("NUMPROTECT_BENCH_MEMORY_BUDGET", "80"))
    await import_blocks(stack)
    channels = [stack.channel(stack.binding_address, Role.TENANT) for _ in range(CHANNELS)]
    workload = Workload(channels)
    await run_for(1.0, concurrency, workload.check)  # warm-up
    ledger = MemoryLedger(stack.redis)

    # Interleaved rounds, so that a change of machine load (the box is shared) hits every phase alike.
    results = Results()
    meter = CpuMeter(stack.pids, stack.redis)
    for _ in range(ROUNDS):
        for phase in PHASES:
            limit = len(workload.live) // 2 if phase.key == "delete" else None  # keep bindings for the next updates
            memory_before = ledger.snapshot() if phase.key == "create" else None
            before = meter.sample()
            outcome, elapsed = await run_for(phase.seconds / ROUNDS, concurrency, workload.call(phase.key), limit=limit)
            meter.add(phase.key, before)
            results.add(phase.key, outcome, elapsed)
            if memory_before is not None:
                ledger.add(memory_before, outcome.ok)
    report_rounds(results, meter, concurrency, stack.security)

    counts, quiet = await count_on_the_wire(workload, stack)
    report_wire(counts, quiet)

    remaining = max(0, memory_target - ledger.bindings)
    memory_before = ledger.snapshot()
    fill, fill_elapsed = await run_for(memory_budget, concurrency, workload.create, limit=remaining)
    ledger.add(memory_before, fill.ok)
    report_memory(ledger, fill, fill_elapsed, memory_target)
    for channel in channels:
        await channel.close(None)
    logged = stack.log_summary()
    print(f"\nthe services' logs at WARNING and above during the run: {'' if logged else 'nothing'}")
    for line in logged:
        print(f"  {line}")


def report_memory(ledger: MemoryLedger, fill: Outcome, fill_elapsed: float, memory_target: int) -> None:
    total_created = ledger.bindings
    if not total_created:
        print("\nno binding created: no memory figure")
        return
    per_binding = ledger.used / total_created
    print(
        f"\nlive AXB bindings created through the service: {total_created:,} "
        f"(fill phase {fill.ok:,} in {fill_elapsed:.0f}s, errors {fill.errors or 0})"
    )
    print(
        f"used_memory delta: {ledger.used:,} bytes -> {per_binding:,.0f} bytes per live AXB binding "
        "(all its keys: record, routes, history, order key, tenant index, allocation reservation)"
    )
    if total_created < memory_target:
        print(
            f"(target was {memory_target:,}; {total_created:,} created in the time budget; "
            f"linear extrapolation to {memory_target:,}: {per_binding * memory_target / 2**20:,.0f} MiB)"
        )
    else:
        print(f"for {total_created:,} bindings: {ledger.used / 2**20:,.1f} MiB")
    print("MEMORY USAGE by key family (delta over the create phases; bytes per binding):")
    for name in sorted(ledger.families):
        keys, size = ledger.families[name]
        print(f"  {name:24s} keys +{keys:>8,}  bytes +{size:>12,}  per binding {size / total_created:8.1f}")


def main() -> int:
    return run_stack(bench, tenant=TENANT)


if __name__ == "__main__":
    raise SystemExit(main())
