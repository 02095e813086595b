"""Translation benchmark: `python -m benchmarks.bench_translation` (part of `make bench`).

Seeds 100,000 AXB bindings in a fresh redis-server, then starts, each pinned to CPU 0 (taskset), for each CPU
scheduling policy in BENCH_POLICIES one `python -m numprotect.services.translation` per security configuration
(CONFIGS: "plain" = NUMPROTECT_TLS=off and NUMPROTECT_AUTH=off, the baseline; "tls" = TLS with no token check;
"secured" = TLS and a carrier's bearer token checked on every call, as deployed) and an empty thread-pool handler
(no interceptors, no Redis) under each policy (batch, normal: the faster is the best ceiling grpcio reaches here).
h2load on the other CPU drives (https:// and `-H "authorization: Bearer <token>"` where the server needs them), in
BENCH_ROUNDS interleaved rounds (rotated order, so a change of the machine's load hits every target alike):
  - the empty handlers,
  - grpc.health.v1.Health/Check of each translation server (the framework's ceiling on the same server),
  - TranslationService/Translate of each (the real hot path: one EVALSHA per call),
then a Python client on the load CPU pushes one long TranslateStream per server. A sample of real responses is
verified (h2load only sees HTTP status). Reports median RPS, p50/p99 (h2load's per-request log), the ratios
the issues target (of the medians, and per round): secured/plain Translate (>= 0.85) with the server CPU per call
each costs, tls/plain (the transport's share), and the identity concern's own cost per call measured in isolation
(`identity_cost`: enter and leave of the call layer's IdentityConcern on a fake context, in this process).
Environment: BENCH_ROUNDS (3), BENCH_DURATION (6s), BENCH_CLIENTS (4), BENCH_STREAMS (16), BENCH_POLICIES
(batch; e.g. batch,normal), BENCH_CONFIGS (plain,tls,secured), BENCH_STREAM_MESSAGES, BENCH_STREAM_BATCH,
BENCH_BINDINGS, BENCH_IDENTITY_CALLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from benchmarks.harness import cpu_seconds, free_port, redis_server_args, wait_redis
from numprotect.core.calls import Method
from numprotect.core.dev_pki import DevPki, ensure_dev_pki
from numprotect.core.identity import api_keys
from numprotect.core.identity.api_keys import HashKey
from numprotect.core.identity.audit import AuditLog
from numprotect.core.identity.directory import (
    CARRIER_BLOCKS_KEY,
    CARRIER_VERSION_KEY,
    RECORD_BLOCK_CARRIER,
    Directory,
    block_of,
)
from numprotect.core.identity.layer import Callers, IdentityConcern
from numprotect.core.identity.principal import Role
from numprotect.core.routes import MODE_AXB, RESTRICTION_NONE, Route, RouteTable, axe_marker_key, caller_key
from numprotect.core.scheduling import POLICIES, apply_cpu_scheduling
from numprotect.translation.v1 import translation_pb2 as pb
from numprotect.translation.v1 import translation_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
BINDINGS = int(os.environ.get("BENCH_BINDINGS", "100000"))
DURATION = os.environ.get("BENCH_DURATION", "6s")
CLIENTS = int(os.environ.get("BENCH_CLIENTS", "4"))
STREAMS_PER_CLIENT = int(os.environ.get("BENCH_STREAMS", "16"))
STREAM_MESSAGES = int(os.environ.get("BENCH_STREAM_MESSAGES", "20000"))
STREAM_BATCH = int(os.environ.get("BENCH_STREAM_BATCH", "32"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
# Security configurations: plain (TLS off, no checks: the baseline), tls (TLS, no checks), secured (TLS + token).
CONFIGS = tuple(os.environ.get("BENCH_CONFIGS", "plain,tls,secured").split(","))
# One translation server per CPU scheduling policy and configuration, named "translation/<policy>/<config>".
SERVERS = tuple(
    f"translation/{policy}/{config}"
    for policy in os.environ.get("BENCH_POLICIES", "batch").split(",")
    for config in CONFIGS
)
IDENTITY_CALLS = int(os.environ.get("BENCH_IDENTITY_CALLS", "200000"))
CARRIER = "bench-carrier"
SERVER_CPU = "0"
LOAD_CPU = "1"
TRANSLATE = "/numprotect.translation.v1.TranslationService/Translate"
HEALTH = "/grpc.health.v1.Health/Check"
EMPTY = "/bench.Empty/Call"


def virtual(i: int) -> str:
    return f"7001{i:011d}"


def party(i: int, side: int) -> str:
    return f"1{3 + side}{i:09d}"


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: 0x00 (uncompressed) + 4-byte big-endian length + bytes."""
    return b"\x00" + struct.pack(">I", len(message)) + message


async def seed(url: str) -> float:
    """Writes BINDINGS AXB routes through the shared routes_apply.lua, pipelined 2,000 at a time."""
    started = time.monotonic()
    redis = Redis.from_url(url)
    await RouteTable._apply.load(redis)
    expire_ms = int(time.time() * 1000) + 3_600_000
    for start in range(0, BINDINGS, 2000):
        pipe = redis.pipeline(transaction=False)
        for i in range(start, min(start + 2000, BINDINGS)):
            x, a, b = virtual(i), party(i, 0), party(i, 1)
            route = Route(f"bench-{i}", "bench", MODE_AXB, a, b, RESTRICTION_NONE, i % 2 == 0, False, expire_ms)
            keys = [axe_marker_key(x), caller_key(x, a), caller_key(x, b)]
            pipe.execute_command(
                "EVALSHA", RouteTable._apply.sha, 3, *keys, route.binding_id, route.encode(), expire_ms, 0, 2, 0
            )
        await pipe.execute()
    await redis.aclose()
    return time.monotonic() - started


@dataclass
class LoadResult:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    ok: int
    failed: int
    cpu_us_per_call: float  # the server process's user + system CPU time per answered call
    busy: float  # the server's CPU time over the run's wall time: near 1.0 means CPU-bound on its core

    def line(self) -> str:
        return (
            f"  {self.name:<32} {self.rps:>6.0f} RPS  p50 {self.p50_ms:6.2f} ms  p99 {self.p99_ms:6.2f} ms"
            f"  CPU {self.cpu_us_per_call:4.0f} us/call, busy {self.busy:4.2f}  ({self.ok} ok, {self.failed} failed)"
        )


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Target:
    """What h2load drives: a server's port and method, with TLS (https://) and a bearer token where needed."""

    port: int
    path: str
    body: bytes
    pid: int
    tls: bool = False
    token: str | None = None


def h2load(name: str, target: Target, workdir: Path) -> LoadResult:
    progress(f"h2load {name}")
    body_file = workdir / f"{name.replace(' ', '_').replace('/', '_')}.bin"
    body_file.write_bytes(grpc_frame(target.body))
    log_file = body_file.with_suffix(".log")
    command = [
        "taskset",
        "-c",
        LOAD_CPU,
        "h2load",
        "-D",
        DURATION,
        "--warm-up-time=1s",
        "-c",
        str(CLIENTS),
        "-m",
        str(STREAMS_PER_CLIENT),
        "-t",
        "1",
        "-d",
        str(body_file),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        *(["-H", f"authorization: Bearer {target.token}"] if target.token else []),
        f"--log-file={log_file}",
        f"{'https' if target.tls else 'http'}://127.0.0.1:{target.port}{target.path}",
    ]
    pid = target.pid
    cpu_before, started = cpu_seconds(pid), time.monotonic()
    output = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
    cpu, wall = cpu_seconds(pid) - cpu_before, time.monotonic() - started
    rps = 0.0
    ok = failed = 0
    for line in output.splitlines():
        if line.startswith("finished in"):
            rps = float(line.split(",")[1].split()[0])
        if line.startswith("requests:"):
            parts = line.replace(",", "").split()
            ok, failed = int(parts[parts.index("succeeded") - 1]), int(parts[parts.index("failed") - 1])
    durations = sorted(int(row.split("\t")[2]) for row in log_file.read_text().splitlines() if row.count("\t") >= 2)
    if not durations or not rps:
        raise RuntimeError(f"h2load {name} failed:\n{output}")
    p50 = durations[len(durations) // 2] / 1000
    p99 = durations[min(len(durations) - 1, int(len(durations) * 0.99))] / 1000
    # The CPU time spans h2load's warm-up second too: its calls are counted at the measured rate.
    answered = len(durations) + int(rps)
    return LoadResult(name, rps, p50, p99, ok, failed, cpu / max(1, answered) * 1e6, cpu / wall)


class Server:
    """One server process pinned to SERVER_CPU."""

    def __init__(self, args: list[str], env: dict[str, str], port: int, security: Security | None = None) -> None:
        self.port = port
        self.security = security
        self.process = subprocess.Popen(
            ["taskset", "-c", SERVER_CPU, sys.executable, *args],
            cwd=ROOT,
            # Untraced whatever the caller's shell says: tracing has its own benchmark (bench_tracing).
            env={**{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.process.kill()
                    _, errors = self.process.communicate(timeout=10)
                    raise RuntimeError(f"server {args} did not start:\n{errors.decode()[-3000:]}")
                time.sleep(0.1)

    def channel(self) -> grpc.Channel:
        """A channel to the server, with TLS and the carrier's token when its configuration needs them."""
        if self.security is None:
            return grpc.insecure_channel(f"127.0.0.1:{self.port}")
        return self.security.channel(self.port)

    def target(self, path: str, body: bytes) -> Target:
        security = self.security
        if security is None:
            return Target(self.port, path, body, self.process.pid)
        return Target(self.port, path, body, self.process.pid, security.tls, security.token)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()


@dataclass(frozen=True)
class Security:
    """One configuration's transport and credentials: the server's settings and how clients reach it."""

    config: str
    pki: DevPki
    key_file: Path
    token: str

    @property
    def tls(self) -> bool:
        return self.config != "plain"

    @property
    def checked(self) -> bool:
        return self.config == "secured"

    def env(self) -> dict[str, str]:
        env = self.pki.tls_env() if self.tls else {"NUMPROTECT_TLS": "off"}
        if self.checked:
            return {**env, "NUMPROTECT_AUTH_KEY_FILE": str(self.key_file)}
        return {**env, "NUMPROTECT_AUTH": "off"}

    def channel(self, port: int) -> grpc.Channel:
        if not self.tls:
            return grpc.insecure_channel(f"127.0.0.1:{port}")
        credentials = grpc.ssl_channel_credentials(root_certificates=self.pki.ca_file.read_bytes())
        if self.checked:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(self.token)
            )
        return grpc.secure_channel(f"127.0.0.1:{port}", credentials)


def prepare_security(workdir: Path, redis_url: str) -> tuple[DevPki, Path, str]:
    """A local PKI, an auth key file, a carrier's token and the carrier recorded for every seeded number's block."""
    pki = ensure_dev_pki(workdir / "pki")
    key_file = workdir / "auth.key"
    key_file.write_text(HashKey.random().encode())
    key_file.chmod(0o600)
    client = SyncRedis.from_url(redis_url)
    try:
        _, token = api_keys.mint_sync(
            client,
            HashKey.from_file("NUMPROTECT_AUTH_KEY_FILE", str(key_file)),
            Role.CARRIER,
            CARRIER,
            description="bench",
            now_ms=time.time_ns() // 1_000_000,
        )
        record = client.register_script(RECORD_BLOCK_CARRIER)
        for block in sorted({block_of(virtual(i)) for i in range(BINDINGS)}):
            record(keys=[CARRIER_BLOCKS_KEY, CARRIER_VERSION_KEY], args=[block, CARRIER])
    finally:
        client.close()
    return pki, key_file, token


def translation_server(
    model: str, redis_url: str, security: Security, extra: Mapping[str, str] | None = None
) -> Server:
    """`model`: "translation/<CPU scheduling policy>/<configuration>" (see SERVERS); `extra`: more settings."""
    port = free_port()
    policy = model.split("/")[1]
    env = {
        **security.env(),  # NUMPROTECT_TLS and NUMPROTECT_AUTH* of the configuration
        "NUMPROTECT_REDIS_URL": redis_url,
        "NUMPROTECT_TRANSLATION_PORT": str(port),
        "NUMPROTECT_CPU_SCHEDULING": policy,
        # h2load repeats one request: limits high enough never to trigger, so the counters still run.
        "NUMPROTECT_TRANSLATION_RATE_PER_CALLER": "1000000",
        "NUMPROTECT_TRANSLATION_RATE_PER_BINDING": "1000000",
        "NUMPROTECT_LOG_LEVEL": "WARNING",
        # This host is shared and noisy: a generous Redis bound keeps a scheduling stall from failing the run.
        "NUMPROTECT_TRANSLATION_REDIS_TIMEOUT": "3s",
        "NUMPROTECT_GRACE_PERIOD": "1s",
        **(extra or {}),
    }
    return Server(["-m", "numprotect.services.translation"], env, port, security)


def verify_sample(server: Server, count: int = 300) -> int:
    """Real answers for random seeded bindings, both directions; returns the number checked."""
    rng = random.Random(7)
    with server.channel() as channel:
        stub = translation_pb2_grpc.TranslationServiceStub(channel)
        for _ in range(count):
            i = rng.randrange(BINDINGS)
            side = rng.randrange(2)
            reply = stub.Translate(
                pb.TranslateRequest(calling_number=party(i, side), called_number=virtual(i)), timeout=5
            )
            expected = (pb.DECISION_CONNECT, party(i, 1 - side), virtual(i), f"bench-{i}")
            actual = (reply.decision, reply.target_number, reply.display_number, reply.binding_id)
            if actual != expected:
                raise AssertionError(f"binding {i}: {actual} != {expected}")
    return count


def stream_rate(server: Server, per_message: int = 1) -> tuple[float, int]:
    """Translations/s over one long TranslateStream from a Python client (random seeded bindings).

    per_message > 1 packs that many calls into each message (TranslateStreamRequest.requests).
    """
    rng = random.Random(11)
    calls = []
    for n in range(STREAM_MESSAGES):
        i = rng.randrange(BINDINGS)
        calls.append(pb.TranslateRequest(calling_number=party(i, n % 2), called_number=virtual(i), call_id=str(n)))
    if per_message == 1:
        messages = [pb.TranslateStreamRequest(request=call) for call in calls]
    else:
        messages = [
            pb.TranslateStreamRequest(requests=calls[i : i + per_message]) for i in range(0, len(calls), per_message)
        ]
    with server.channel() as channel:
        stub = translation_pb2_grpc.TranslationServiceStub(channel)
        started = time.monotonic()
        connected = 0
        for message in stub.TranslateStream(iter(messages), timeout=90):
            if message.responses:
                connected += sum(r.response.decision == pb.DECISION_CONNECT for r in message.responses)
            else:
                connected += message.response.decision == pb.DECISION_CONNECT
        elapsed = time.monotonic() - started
    return STREAM_MESSAGES / elapsed, connected


def measured_stream(server: Server, per_message: int) -> tuple[float, int, float, float]:
    """stream_rate plus the server's CPU time per call and its busy share during the stream.

    The client is Python too and may be the slower side: the server's CPU per call is what a server core costs.
    """
    cpu_before, started = cpu_seconds(server.process.pid), time.monotonic()
    rate, connected = stream_rate(server, per_message)
    cpu, wall = cpu_seconds(server.process.pid) - cpu_before, time.monotonic() - started
    return rate, connected, cpu / STREAM_MESSAGES * 1e6, cpu / wall


class FakeContext:
    """What IdentityConcern reads of a grpcio ServicerContext: the metadata, the peer, the final code."""

    def __init__(self, token: str) -> None:
        self._metadata = (("content-type", "application/grpc"), ("authorization", f"Bearer {token}"))

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:50000"

    def code(self) -> None:
        return None


def identity_cost(redis_url: str, key_file: Path, token: str) -> tuple[float, float, float]:
    """The identity concern's own cost per Translate, in this process: IdentityConcern enter + leave (bearer token
    looked up and verified, role checked, principal made current) plus the servicer's carrier-block check, on a
    fake context, with the directory loaded from the bench's Redis. Returns (wall us per call, CPU us per call,
    wall us per call of the carrier check alone)."""
    hash_key = HashKey.from_file("NUMPROTECT_AUTH_KEY_FILE", str(key_file))
    client = SyncRedis.from_url(redis_url)
    try:
        directory = Directory(hash_key, client, refresh_seconds=1.0, now_ms=lambda: time.time_ns() // 1_000_000)
        directory.reload()  # no refresher thread: nothing else runs meanwhile
        callers = Callers(directory)
        concern = IdentityConcern(callers, directory, AuditLog(hash_key.derive("audit"), client))
        method = concern.for_method(Method.from_path(TRANSLATE))
        context = FakeContext(token)
        request = pb.TranslateRequest(calling_number=party(42, 0), called_number=virtual(42), call_id="bench")
        called = request.called_number
        require = callers.require_carrier_routes

        def one() -> None:
            state = method.enter(context, request)
            require(called)
            method.leave(state, context)

        for _ in range(10_000):  # warm: the verified-token cache filled, code paths hot
            one()
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(IDENTITY_CALLS):
            one()
        wall_us = (time.perf_counter() - wall) / IDENTITY_CALLS * 1e6
        cpu_us = (time.process_time() - cpu) / IDENTITY_CALLS * 1e6
        token_state = method.enter(context, request)
        started = time.perf_counter()
        for _ in range(IDENTITY_CALLS):
            require(called)
        check_us = (time.perf_counter() - started) / IDENTITY_CALLS * 1e6
        method.leave(token_state, context)
        return wall_us, cpu_us, check_us
    finally:
        client.close()


def empty_server(port: int, policy: str) -> None:
    """The best case: a sync grpcio server whose one method returns empty bytes (no interceptors, no Redis).

    `policy`: the CPU scheduling of its threads (see numprotect.core.scheduling); the best ceiling is the faster.
    """
    apply_cpu_scheduling(policy)

    def call(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b""

    handler = grpc.method_handlers_generic_handler("bench.Empty", {"Call": grpc.unary_unary_rpc_method_handler(call)})
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16), handlers=[handler], options=[("grpc.so_reuseport", 0)]
    )
    health = __import__("grpc_health.v1.health", fromlist=["HealthServicer"]).HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def main() -> int:
    if not shutil.which("h2load"):
        print("h2load not found: install Debian package nghttp2-client (make system-deps)")
        return 1
    # This process (the TranslateStream client) runs beside h2load and Redis, off the server's core.
    os.sched_setaffinity(0, {int(LOAD_CPU)})
    lines: list[str] = []
    with load_side_redis("bench-translation-") as (workdir, redis_url), started_servers() as servers:
        progress("seeding")
        seconds = asyncio.run(seed(redis_url))
        lines.append(f"seeded {BINDINGS} AXB bindings ({2 * BINDINGS} route keys) in {seconds:.1f}s")
        request = pb.TranslateRequest(calling_number=party(42, 0), called_number=virtual(42), call_id="bench")
        health_body = health_pb2.HealthCheckRequest().SerializeToString()

        pki, key_file, token = prepare_security(workdir, redis_url)
        progress("identity concern, in isolation")
        identity_wall, identity_cpu, carrier_check = identity_cost(redis_url, key_file, token)

        targets: dict[str, Target] = {}
        for policy in POLICIES:
            empty_port = free_port()
            empty_args = ["-m", "benchmarks.bench_translation", "--empty-server", str(empty_port), policy]
            empty_server_process = Server(empty_args, {}, empty_port)
            servers.append(empty_server_process)
            targets[f"empty/{policy}"] = empty_server_process.target(EMPTY, b"")
        translation_servers = {
            model: translation_server(model, redis_url, Security(model.split("/")[2], pki, key_file, token))
            for model in SERVERS
        }
        servers.extend(translation_servers.values())
        for model, server in translation_servers.items():
            lines.append(f"{model}: verified {verify_sample(server)} sampled Translate answers: all correct")
            targets[f"{model} health"] = server.target(HEALTH, health_body)
            targets[f"{model} translate"] = server.target(TRANSLATE, request.SerializeToString())
        # Interleaved rounds, each in a rotated order: a change in the machine's load hits every target alike,
        # and each ratio is also computed within one round.
        names = list(targets)
        runs: dict[str, list[LoadResult]] = {name: [] for name in names}
        for round_number in range(ROUNDS):
            shift = round_number % len(names)
            for name in names[shift:] + names[:shift]:
                runs[name].append(h2load(f"{name} #{round_number + 1}", targets[name], workdir))
        streams: dict[str, tuple[float, int, float, float]] = {}
        batched: dict[str, tuple[float, int, float, float]] = {}
        for model, server in translation_servers.items():
            progress(f"{model}: TranslateStream")
            try:
                streams[model] = measured_stream(server, 1)
                progress(f"{model}: TranslateStream, {STREAM_BATCH} calls per message")
                batched[model] = measured_stream(server, STREAM_BATCH)
            except grpc.RpcError as exc:
                lines.append(f"{model}: TranslateStream FAILED: {exc}")
                streams.setdefault(model, (0.0, 0, 0.0, 0.0))
                batched.setdefault(model, (0.0, 0, 0.0, 0.0))

        lines.append(
            f"server on CPU {SERVER_CPU} (taskset), h2load + redis + stream client on CPU {LOAD_CPU}; h2load -D "
            f"{DURATION} -c {CLIENTS} -m {STREAMS_PER_CLIENT}; {ROUNDS} interleaved rounds; load average now "
            f"{os.getloadavg()[0]:.1f}"
        )
        lines.append("")
        lines.append("median of the rounds (RPS per round):")
        median: dict[str, LoadResult] = {}
        for name in names:
            ordered = sorted(runs[name], key=lambda r: r.rps)
            median[name] = ordered[len(ordered) // 2]
            per_round = ", ".join(f"{r.rps:.0f}" for r in runs[name])
            lines.append(f"{median[name].line()}   rounds: {per_round}")
        for model in SERVERS:
            rate, connected, cpu, busy = streams[model]
            lines.append(
                f"  {model + ': TranslateStream (1 stream)':<48} {rate:>9.0f} msg/s  CPU {cpu:4.0f} us/call, busy "
                f"{busy:4.2f}  ({connected}/{STREAM_MESSAGES} CONNECT)"
            )
            rate, connected, cpu, busy = batched[model]
            lines.append(
                f"  {model + f': TranslateStream ({STREAM_BATCH}/message)':<48} {rate:>9.0f} calls/s  CPU {cpu:4.0f} "
                f"us/call, busy {busy:4.2f}  ({connected}/{STREAM_MESSAGES} CONNECT)"
            )
        lines.append("")
        # The best empty-handler ceiling: the faster scheduling policy (its median), and per round the faster.
        best_empty = max((f"empty/{policy}" for policy in POLICIES), key=lambda name: median[name].rps)
        empty = [max(rounds) for rounds in zip(*([r.rps for r in runs[f"empty/{p}"]] for p in POLICIES), strict=True)]
        lines.append(f"best empty-handler ceiling: {best_empty} ({median[best_empty].rps:.0f} RPS)")
        for model in SERVERS:
            translate = [r.rps for r in runs[f"{model} translate"]]
            health = [r.rps for r in runs[f"{model} health"]]
            per_round_health = ", ".join(f"{t / h:.2f}" for t, h in zip(translate, health, strict=True))
            per_round_empty = ", ".join(f"{t / e:.2f}" for t, e in zip(translate, empty, strict=True))
            t = median[f"{model} translate"].rps
            lines.append(
                f"{model}: translate/health = {t / median[f'{model} health'].rps:.2f} (target >= 0.8; per round "
                f"{per_round_health}); translate/empty-ceiling = {t / median[best_empty].rps:.2f} (target >= 0.8; "
                f"per round {per_round_empty}); stream/unary = {streams[model][0] / t:.2f}, batched stream/unary = "
                f"{batched[model][0] / t:.2f} (target >= 3)"
            )
            # Per server core: calls a core can answer = 1 / CPU per call, so the ratio of CPU per call.
            unary_cpu = median[f"{model} translate"].cpu_us_per_call
            lines.append(
                f"{model}: per server core (unary CPU per call / stream CPU per call): stream/unary = "
                f"{unary_cpu / max(1e-9, streams[model][2]):.2f}, batched stream/unary = "
                f"{unary_cpu / max(1e-9, batched[model][2]):.2f} (target >= 3)"
            )
        lines.append("")
        for model in SERVERS:
            policy, config = model.split("/")[1:]
            baseline = f"translation/{policy}/plain"
            if config == "plain" or baseline not in SERVERS:
                continue
            ours = [r.rps for r in runs[f"{model} translate"]]
            plain = [r.rps for r in runs[f"{baseline} translate"]]
            per_round = ", ".join(f"{o / b:.2f}" for o, b in zip(ours, plain, strict=True))
            ratio = median[f"{model} translate"].rps / median[f"{baseline} translate"].rps
            extra_cpu = median[f"{model} translate"].cpu_us_per_call - median[f"{baseline} translate"].cpu_us_per_call
            target = " (target >= 0.85)" if config == "secured" else ""
            lines.append(
                f"{model} / {baseline} Translate = {ratio:.2f}{target}; per round {per_round}; server CPU "
                f"{extra_cpu:+.0f} us/call"
            )
        lines.append(
            f"identity concern alone (enter + leave + carrier-block check, in-process, {IDENTITY_CALLS} calls): "
            f"{identity_wall:.2f} us/call wall, {identity_cpu:.2f} us/call CPU; the carrier-block check alone "
            f"{carrier_check:.2f} us/call"
        )
        for config in CONFIGS:  # the scheduling policies compared, within one configuration
            models = [m for m in SERVERS if m.endswith(f"/{config}")]
            if len(models) < 2:
                continue
            best = max(models, key=lambda m: median[f"{m} translate"].rps)
            others = sorted(models, key=lambda m: m != best)
            lines.append(
                f"faster unary Translate: {best} ("
                + " vs ".join(f"{m} {median[f'{m} translate'].rps:.0f}" for m in others)
                + " RPS)"
            )
        failed = sum(r.failed for results in runs.values() for r in results)
        lines.append(f"h2load failed requests: {failed}")
    print("\n".join(lines))
    return 0


@contextlib.contextmanager
def load_side_redis(prefix: str) -> Iterator[tuple[Path, str]]:
    """A fresh redis-server (no AOF) on LOAD_CPU in a new work directory: (the directory, its URL); both go at the
    end."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    redis_port = free_port()
    redis_args = redis_server_args("redis-server", redis_port, workdir, "--appendonly", "no")
    redis_proc = subprocess.Popen(["taskset", "-c", LOAD_CPU, *redis_args], stdout=subprocess.DEVNULL)
    try:
        wait_redis(redis_port, timeout=20)  # a loaded host can take a while to start redis-server
        yield workdir, f"redis://127.0.0.1:{redis_port}/0"
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def started_servers() -> Iterator[list[Server]]:
    """A list to add the servers a run starts to; each is stopped at the end."""
    servers: list[Server] = []
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--empty-server":
        empty_server(int(sys.argv[2]), sys.argv[3])
    else:
        raise SystemExit(main())
