"""Webhook delivery benchmark: events delivered per second by one events process (its dispatcher) to a local
receiver, as a ratio of the same process's Health/Check/s measured in the same run (issue 18).

Starts a redis-server and a receiver process (aiohttp, answers 204, checks every SIGNATURE_SAMPLE-th signature
with the standardwebhooks library, keeps every webhook-id it got) on CPU 1, and one events process pinned to CPU 0
(taskset; plaintext, no identity checks: the service's own work), with ENDPOINTS endpoints of one tenant on the
receiver for each kind: "single" (batch_size 1: one event per request, the default) and "batch20" (batch_size 20).
Then interleaved rounds (the host is shared; each round hits every phase alike) of:
  - health: Health/Check from HEALTH_CLIENTS closed-loop clients for HEALTH_SECONDS: checks/s, the process's CPU per
    check;
  - per kind: EVENTS_PER_ROUND events (x ROUND_SCALE; a ~400-byte binding.created body each) logged and queued for
    the kind's endpoints while they are paused (as the router queues them), then the pause lifted; the queues are
    sampled every SAMPLE_SECONDS until empty: events/s between 10 % and 90 % delivered (the steady middle), the
    CPU per event of the events process, Redis and the receiver over that window, and how busy the process was.
Reports the medians: events/s / Health/Check/s per kind (the issue's figure; on a shared host it is bound by the
latency of each hop, the process stays far from busy), and the CPU per event in Health/Check units (what one
core of the process could deliver); checks that the receiver got every event once (by id) with valid signatures,
exit 1 otherwise.
Run: python -m benchmarks.bench_webhooks (make bench BENCH_ARGS=webhooks). Environment: BENCH_ROUNDS (5),
BENCH_WEBHOOK_EVENTS (5000; batched rounds 10x), BENCH_HEALTH_SECONDS (5), BENCH_WEBHOOK_ENDPOINTS (16),
BENCH_WEBHOOK_ENDPOINT_CONCURRENCY (16).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.harness import cpu_seconds, free_port, process, redis_server_args, wait_redis, wait_serving
from benchmarks.load import redis_cpu_seconds, run_for
from numprotect.core.clock import SystemClock
from numprotect.core.event_keys import TenantKeys, event_id
from numprotect.core.redis_client import create_redis
from numprotect.core.settings import Env, RedisSettings
from numprotect.services.events.endpoints import EndpointSpec, EndpointStore, StoredEndpoint
from numprotect.services.events.settings import EventsSettings

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
EVENTS_PER_ROUND = int(os.environ.get("BENCH_WEBHOOK_EVENTS", "5000"))
HEALTH_SECONDS = float(os.environ.get("BENCH_HEALTH_SECONDS", "5"))
HEALTH_CLIENTS = 16
CHANNELS = 4
ENDPOINTS = int(os.environ.get("BENCH_WEBHOOK_ENDPOINTS", "16"))
# Requests in flight per endpoint: ENDPOINTS x this = the dispatcher's own bound (sender.REQUESTS_IN_FLIGHT), so the
# rate is what the process delivers, not what a few endpoints' concurrency limits allow on a host where every hop
# waits for a CPU.
ENDPOINT_CONCURRENCY = int(os.environ.get("BENCH_WEBHOOK_ENDPOINT_CONCURRENCY", "16"))
KINDS = {"single": 1, "batch20": 20}
# Events per round of a kind: EVENTS_PER_ROUND x this (a batched round of as many events is over within a few
# samples).
ROUND_SCALE = {"single": 1, "batch20": 10}
SAMPLE_SECONDS = 0.05
ROUND_TIMEOUT_SECONDS = 300.0
SIGNATURE_SAMPLE = 50
SERVER_CPU = "0"
LOAD_CPU = "1"
TENANT = "bench"
FAR_FUTURE_MS = 10**13  # a pause that lasts until the bench lifts it


# --- the receiver (its own process: python -m benchmarks.bench_webhooks --sink PORT SECRETS_FILE) --------------


def sink(port: int, secrets_file: str) -> None:
    from aiohttp import web
    from standardwebhooks import Webhook

    verifiers = {path: Webhook(secret) for path, secret in json.loads(Path(secrets_file).read_text()).items()}
    ids: set[str] = set()
    stats = {"requests": 0, "events": 0, "repeated": 0, "verified": 0, "bad_signatures": 0}

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        stats["requests"] += 1
        if stats["requests"] % SIGNATURE_SAMPLE == 1:
            try:
                verifiers[request.path].verify(body, dict(request.headers))
                stats["verified"] += 1
            except Exception:
                stats["bad_signatures"] += 1
        events = json.loads(body)
        for event in events if isinstance(events, list) else [events]:
            stats["events"] += 1
            if event["id"] in ids:
                stats["repeated"] += 1
            ids.add(event["id"])
        return web.Response(status=204)

    async def report(request: web.Request) -> web.Response:
        return web.json_response(stats)

    app = web.Application()
    app.router.add_get("/stats", report)
    app.router.add_post("/{tail:.*}", hook)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def sink_stats(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as reply:
        stats: dict[str, int] = json.loads(reply.read())
        return stats


# --- the bench ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryRound:
    """One round of one kind, between 10 % and 90 % delivered."""

    rate: float  # events/s
    cpu: float  # events process, CPU s per event
    redis_cpu: float  # s per event
    sink_cpu: float  # the receiver's, s per event
    busy: float  # the events process's CPU s per second of the window


@dataclass
class Results:
    health_rates: list[float] = field(default_factory=list)
    health_cpu: list[float] = field(default_factory=list)  # events process, s per check
    rounds: dict[str, list[DeliveryRound]] = field(default_factory=dict)  # per kind
    delivered: int = 0


def body(n: int, at_ms: int) -> tuple[str, bytes]:
    event = event_id("binding.created", f"bench-{n}", "1")
    data = {
        "bindingId": f"b-{n:012d}",
        "tenantId": TENANT,
        "virtualNumber": "70020000001",
        "partyA": "13800000001",
        "partyB": "13900000002",
        "mode": "BINDING_MODE_AXB",
        "expireTime": "2026-12-01T12:00:00Z",
        "createTime": "2026-12-01T00:00:00Z",
        "orderId": f"order-{n}",
        "callRestriction": "CALL_RESTRICTION_NONE",
    }
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at_ms / 1000)) + f".{at_ms % 1000:03d}Z"
    payload = {"id": event, "type": "binding.created", "timestamp": stamp, "data": data}
    return event, json.dumps(payload, separators=(",", ":")).encode()


def enqueue(client: redis.Redis, endpoints: list[StoredEndpoint], first: int, count: int) -> None:
    """Logs `count` events and queues them round-robin for `endpoints` (route.lua's enqueue step)."""
    keys = TenantKeys(TENANT)
    at_ms = int(time.time() * 1000)
    for start in range(0, count, 500):
        pipe = client.pipeline(transaction=False)
        for n in range(first + start, first + min(count, start + 500)):
            event, payload = body(n, at_ms)
            pipe.xadd(keys.log, {"id": event, "ty": "binding.created", "at": at_ms, "p": payload})
        log_ids = pipe.execute()
        pipe = client.pipeline(transaction=False)
        for i, log_id in enumerate(log_ids):
            ep = endpoints[(start + i) % len(endpoints)].endpoint_id
            pipe.hset(keys.attempts(ep), log_id, 0)
            pipe.zadd(keys.queue(ep), {log_id: at_ms}, nx=True)
        pipe.execute()


def set_paused(client: redis.Redis, endpoints: list[StoredEndpoint], paused: bool) -> None:
    keys = TenantKeys(TENANT)
    pipe = client.pipeline(transaction=False)
    for endpoint in endpoints:
        if paused:
            pipe.hset(keys.state(endpoint.endpoint_id), "pause", FAR_FUTURE_MS)
        else:
            pipe.hdel(keys.state(endpoint.endpoint_id), "pause")
        pipe.zadd(keys.ready, {endpoint.endpoint_id: 0})
    pipe.execute()


def remaining(client: redis.Redis, endpoints: list[StoredEndpoint]) -> int:
    keys = TenantKeys(TENANT)
    pipe = client.pipeline(transaction=False)
    for endpoint in endpoints:
        pipe.zcard(keys.queue(endpoint.endpoint_id))
        pipe.zcard(keys.in_flight(endpoint.endpoint_id))
    return sum(pipe.execute())


def deliver_round(
    client: redis.Redis, endpoints: list[StoredEndpoint], first: int, count: int, pids: tuple[int, int]
) -> DeliveryRound:
    """One round of one kind: `count` events queued while paused, then sent (`pids`: the events process's and the
    receiver's)."""
    enqueue(client, endpoints, first, count)
    low, high = int(count * 0.9), int(count * 0.1)
    set_paused(client, endpoints, False)
    marks: dict[str, tuple[float, int, float, float, float]] = {}
    pid, sink_pid = pids
    deadline = time.monotonic() + ROUND_TIMEOUT_SECONDS
    while True:
        left = remaining(client, endpoints)
        now = time.monotonic()
        if "start" not in marks and left <= low:
            marks["start"] = (now, left, cpu_seconds(pid), redis_cpu_seconds(client), cpu_seconds(sink_pid))
        if "end" not in marks and left <= high:
            marks["end"] = (now, left, cpu_seconds(pid), redis_cpu_seconds(client), cpu_seconds(sink_pid))
        if left == 0:
            break
        if now > deadline:
            raise RuntimeError(f"{left} events still queued after {ROUND_TIMEOUT_SECONDS:g}s")
        time.sleep(SAMPLE_SECONDS)
    set_paused(client, endpoints, True)
    (t0, left0, cpu0, redis0, sink0), (t1, left1, cpu1, redis1, sink1) = marks["start"], marks["end"]
    events = left0 - left1
    return DeliveryRound(
        events / (t1 - t0),
        (cpu1 - cpu0) / events,
        (redis1 - redis0) / events,
        (sink1 - sink0) / events,
        (cpu1 - cpu0) / (t1 - t0),
    )


async def health_round(address: str, pid: int) -> tuple[float, float]:
    channels = [grpc.aio.insecure_channel(address) for _ in range(CHANNELS)]
    try:
        stubs = [health_pb2_grpc.HealthStub(c) for c in channels]

        async def check(i: int) -> None:
            await stubs[i % CHANNELS].Check(health_pb2.HealthCheckRequest(), timeout=10)

        await run_for(1.0, HEALTH_CLIENTS, check)  # warm-up
        before = cpu_seconds(pid)
        outcome, elapsed = await run_for(HEALTH_SECONDS, HEALTH_CLIENTS, check)
        used = cpu_seconds(pid) - before
    finally:
        for channel in channels:
            await channel.close(None)
    return outcome.ok / elapsed, used / max(1, outcome.ok)


async def create_endpoints(redis_url: str, sink_port: int) -> dict[str, list[StoredEndpoint]]:
    environ = {"NUMPROTECT_REDIS_URL": redis_url, "NUMPROTECT_EVENTS_ALLOW_HTTP": "on"}
    client = create_redis(RedisSettings.from_env(Env(environ)))
    try:
        store = EndpointStore(client, EventsSettings.from_env(Env(environ)), SystemClock())
        made: dict[str, list[StoredEndpoint]] = {}
        for kind, batch_size in KINDS.items():
            made[kind] = [
                await store.create(
                    EndpointSpec(
                        TENANT,
                        f"http://127.0.0.1:{sink_port}/{kind}/{i}",
                        (),
                        "bench receiver",
                        batch_size,
                        ENDPOINT_CONCURRENCY,
                    )
                )
                for i in range(ENDPOINTS)
            ]
        return made
    finally:
        await client.aclose()


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--sink":
        sink(int(sys.argv[2]), sys.argv[3])
        return 0
    redis_binary = shutil.which("redis-server")
    if redis_binary is None:
        print("redis-server not found: run `make system-deps`", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {int(LOAD_CPU)})
    workdir = Path(tempfile.mkdtemp(prefix="numprotect-bench-webhooks-"))
    redis_port, sink_port, events_port = free_port(), free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    env = {
        **os.environ,
        "NUMPROTECT_TLS": "off",
        "NUMPROTECT_AUTH": "off",
        "NUMPROTECT_REDIS_URL": redis_url,
        "NUMPROTECT_LOG_LEVEL": "WARNING",
        "NUMPROTECT_EVENTS_PORT": str(events_port),
        "NUMPROTECT_EVENTS_ALLOW_HTTP": "on",
        "NUMPROTECT_EVENTS_ALLOWED_NETWORKS": "127.0.0.0/8",
        "NUMPROTECT_EVENTS_POLL_INTERVAL": "50ms",
        "NUMPROTECT_EVENTS_SWEEP_INTERVAL": "1h",
    }
    lines: list[str] = []
    taskset = ["taskset", "-c"] if shutil.which("taskset") else []
    try:
        with process(
            [*taskset, *([LOAD_CPU] if taskset else []), *redis_server_args(redis_binary, redis_port, workdir)],
            env,
            workdir / "redis.log",
        ):
            client = wait_redis(redis_port)
            endpoints = asyncio.run(create_endpoints(redis_url, sink_port))
            secrets_file = workdir / "secrets.json"
            secrets_file.write_text(
                json.dumps({f"/{k}/{i}": e.secret for k, eps in endpoints.items() for i, e in enumerate(eps)})
            )
            for eps in endpoints.values():
                set_paused(client, eps, True)
            sink_args = [sys.executable, "-m", "benchmarks.bench_webhooks", "--sink", str(sink_port), str(secrets_file)]
            with process(
                [*taskset, *([LOAD_CPU] if taskset else []), *sink_args], env, workdir / "sink.log"
            ) as receiver:
                events_args = [sys.executable, "-m", "numprotect.services.events"]
                events_log = workdir / "events.log"
                with process([*taskset, *([SERVER_CPU] if taskset else []), *events_args], env, events_log) as events:
                    wait_serving(f"127.0.0.1:{events_port}", events, events_log)
                    _wait_sink(sink_port)
                    results = run_rounds(client, endpoints, f"127.0.0.1:{events_port}", (events.pid, receiver.pid))
                    stats = sink_stats(sink_port)
                    code = report(results, stats, lines, taskset != [])
                    lines += log_summary(events_log)
                    return code
    except BaseException:
        for name in ("events.log", "sink.log"):
            path = workdir / name
            if path.exists():
                print(f"--- {name} (last lines)\n{path.read_text()[-3000:]}", file=sys.stderr)
        raise
    finally:
        print("\n".join(lines))
        shutil.rmtree(workdir, ignore_errors=True)


def log_summary(path: Path, most: int = 5) -> list[str]:
    """What the events process logged at WARNING and above: counts by message, most frequent first."""
    counts: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            counts[f"(not JSON) {line[:160]}"] += 1
            continue
        if entry.get("level") in ("WARNING", "ERROR", "CRITICAL"):
            counts[f"{entry.get('level')} {str(entry.get('msg', ''))[:120]} {str(entry.get('error', ''))[:120]}"] += 1
    if not counts:
        return ["events process log: no warnings"]
    return ["events process log:"] + [f"  {n} x {message}" for message, n in counts.most_common(most)]


def _wait_sink(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            sink_stats(port)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def run_rounds(
    client: redis.Redis, endpoints: dict[str, list[StoredEndpoint]], address: str, pids: tuple[int, int]
) -> Results:
    pid = pids[0]
    results = Results()
    first = 0
    for round_number in range(ROUNDS):
        phases = ["health", *KINDS]
        if round_number % 2:
            phases.reverse()
        for phase in phases:
            if phase == "health":
                rate, cpu = asyncio.run(health_round(address, pid))
                results.health_rates.append(rate)
                results.health_cpu.append(cpu)
                print(f"round {round_number + 1} health: {rate:,.0f} checks/s", file=sys.stderr, flush=True)
                continue
            count = EVENTS_PER_ROUND * ROUND_SCALE[phase]
            measured = deliver_round(client, endpoints[phase], first, count, pids)
            first += count
            results.delivered += count
            results.rounds.setdefault(phase, []).append(measured)
            print(f"round {round_number + 1} {phase}: {measured.rate:,.0f} events/s", file=sys.stderr, flush=True)
    return results


def report(results: Results, stats: dict[str, int], lines: list[str], pinned_cpus: bool) -> int:
    health = statistics.median(results.health_rates)
    health_cpu = statistics.median(results.health_cpu)
    placement = (
        f"events process on CPU {SERVER_CPU} (taskset), Redis + receiver + bench on CPU {LOAD_CPU}"
        if pinned_cpus
        else "no taskset: processes not pinned"
    )
    per_kind = ", ".join(f"{EVENTS_PER_ROUND * ROUND_SCALE[kind]} {kind}" for kind in KINDS)
    lines.append(
        f"one events process (plaintext, no identity checks; its dispatcher and its Health/Check), {placement}; "
        f"{ENDPOINTS} endpoints per kind (max_concurrency {ENDPOINT_CONCURRENCY}) on one local receiver (answers "
        f"204); {ROUNDS} interleaved rounds of {per_kind} events, {HEALTH_SECONDS:g}s of Health/Check from "
        f"{HEALTH_CLIENTS} clients; load average now {os.getloadavg()[0]:.1f}"
    )
    lines.append("")
    per_round = ", ".join(f"{r:,.0f}" for r in results.health_rates)
    lines.append(
        f"Health/Check/s: median {health:,.0f} (rounds: {per_round}); CPU per check {health_cpu * 1e6:,.0f} us"
    )
    for kind, batch_size in KINDS.items():
        rounds = results.rounds[kind]
        rate = statistics.median(r.rate for r in rounds)
        cpu = statistics.median(r.cpu for r in rounds)
        per_round = ", ".join(f"{r.rate:,.0f}" for r in rounds)
        lines.append(
            f"{kind} (batch_size {batch_size}): median {rate:,.0f} events/s (rounds: {per_round}); "
            f"events/s / Health/Check/s = {rate / health:.3f}"
        )
        lines.append(
            f"  CPU per event: events process {cpu * 1e6:,.0f} us ({cpu / health_cpu:.2f} Health/Checks; at most "
            f"{1 / cpu:,.0f} events/s per core, {health_cpu / cpu:.3f} of Health/Check/s), Redis "
            f"{statistics.median(r.redis_cpu for r in rounds) * 1e6:,.0f} us, receiver "
            f"{statistics.median(r.sink_cpu for r in rounds) * 1e6:,.0f} us; events process busy "
            f"{statistics.median(r.busy for r in rounds):.2f} of a core"
        )
    lines.append("")
    lines.append(
        f"receiver: {stats['requests']:,} requests, {stats['events']:,} events ({results.delivered:,} queued), "
        f"{stats['repeated']} repeated ids, {stats['verified']} signatures checked, {stats['bad_signatures']} bad"
    )
    ok = (
        stats["events"] == results.delivered
        and stats["repeated"] == 0
        and stats["bad_signatures"] == 0
        and stats["verified"] > 0
    )
    if not ok:
        lines.append("ERROR: the receiver did not get every event exactly once with valid signatures")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
