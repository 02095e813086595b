"""Translation benchmark: `python -m benchmarks.bench_translation` (part of `make bench`).

Seeds 100,000 AXB bindings in a fresh redis-server, then starts, each pinned to CPU 0 (taskset), one
`python -m numprotect.services.translation` per CPU scheduling policy in BENCH_POLICIES and an empty thread-pool
handler (no interceptors, no Redis) under each policy (batch, normal: the faster is the best ceiling grpcio reaches
here). h2load on the other CPU drives, in BENCH_ROUNDS interleaved rounds (rotated order, so a change of the
machine's load hits every target alike):
  - the empty handlers,
  - grpc.health.v1.Health/Check of each translation server (the framework's ceiling on the same server),
  - TranslationService/Translate of each (the real hot path: one EVALSHA per call),
then a Python client on the load CPU pushes one long TranslateStream per server. A sample of real responses is
verified (h2load only sees HTTP status). Reports median RPS, p50/p99 (h2load's per-request log), the ratios
the issue targets (of the medians, and per round), and the stream rates.
Environment: BENCH_ROUNDS (3), BENCH_DURATION (6s), BENCH_CLIENTS (4), BENCH_STREAMS (16), BENCH_POLICIES
(batch; e.g. batch,normal), BENCH_STREAM_MESSAGES, BENCH_STREAM_BATCH, BENCH_BINDINGS.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis

from benchmarks.harness import cpu_seconds, free_port, redis_server_args, wait_redis
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
# One translation server per CPU scheduling policy, named "translation/<policy>".
SERVERS = tuple(f"translation/{policy}" for policy in os.environ.get("BENCH_POLICIES", "batch").split(","))
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


def h2load(name: str, port: int, path: str, body: bytes, workdir: Path, pid: int) -> LoadResult:
    progress(f"h2load {name}")
    body_file = workdir / f"{name.replace(' ', '_').replace('/', '_')}.bin"
    body_file.write_bytes(grpc_frame(body))
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
        f"--log-file={log_file}",
        f"http://127.0.0.1:{port}{path}",
    ]
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

    def __init__(self, args: list[str], env: dict[str, str], port: int) -> None:
        self.port = port
        self.process = subprocess.Popen(
            ["taskset", "-c", SERVER_CPU, sys.executable, *args],
            cwd=ROOT,
            # Untraced whatever the caller's shell says: tracing has its own benchmark (bench_tracing).
            env={**{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"server {args} did not start")
                time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()


def translation_server(model: str, redis_url: str) -> Server:
    """`model`: "translation/<CPU scheduling policy>" (see SERVERS)."""
    port = free_port()
    policy = model.partition("/")[2]
    env = {
        # Plaintext for now (TLS is the services' default); the TLS and token comparison is yet to come.
        "NUMPROTECT_TLS": "off",
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
    }
    return Server(["-m", "numprotect.services.translation"], env, port)


def verify_sample(port: int, count: int = 300) -> int:
    """Real answers for random seeded bindings, both directions; returns the number checked."""
    rng = random.Random(7)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
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


def stream_rate(port: int, per_message: int = 1) -> tuple[float, int]:
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
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
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
    rate, connected = stream_rate(server.port, per_message)
    cpu, wall = cpu_seconds(server.process.pid) - cpu_before, time.monotonic() - started
    return rate, connected, cpu / STREAM_MESSAGES * 1e6, cpu / wall


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
    workdir = Path(tempfile.mkdtemp(prefix="bench-translation-"))
    redis_port = free_port()
    redis_args = redis_server_args("redis-server", redis_port, workdir, "--appendonly", "no")
    redis_proc = subprocess.Popen(["taskset", "-c", LOAD_CPU, *redis_args], stdout=subprocess.DEVNULL)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    wait_redis(redis_port, timeout=20)  # a loaded host can take a while to start redis-server
    lines: list[str] = []
    servers: list[Server] = []
    try:
        progress("seeding")
        seconds = asyncio.run(seed(redis_url))
        lines.append(f"seeded {BINDINGS} AXB bindings ({2 * BINDINGS} route keys) in {seconds:.1f}s")
        request = pb.TranslateRequest(calling_number=party(42, 0), called_number=virtual(42), call_id="bench")
        health_body = health_pb2.HealthCheckRequest().SerializeToString()

        targets: dict[str, tuple[int, str, bytes, int]] = {}
        for policy in POLICIES:
            empty_port = free_port()
            empty_args = ["-m", "benchmarks.bench_translation", "--empty-server", str(empty_port), policy]
            empty_server_process = Server(empty_args, {}, empty_port)
            servers.append(empty_server_process)
            targets[f"empty/{policy}"] = (empty_port, EMPTY, b"", empty_server_process.process.pid)
        translation_servers = {model: translation_server(model, redis_url) for model in SERVERS}
        servers.extend(translation_servers.values())
        for model, server in translation_servers.items():
            lines.append(f"{model}: verified {verify_sample(server.port)} sampled Translate answers: all correct")
            targets[f"{model} health"] = (server.port, HEALTH, health_body, server.process.pid)
            targets[f"{model} translate"] = (server.port, TRANSLATE, request.SerializeToString(), server.process.pid)
        # Interleaved rounds, each in a rotated order: a change in the machine's load hits every target alike,
        # and each ratio is also computed within one round.
        names = list(targets)
        runs: dict[str, list[LoadResult]] = {name: [] for name in names}
        for round_number in range(ROUNDS):
            shift = round_number % len(names)
            for name in names[shift:] + names[:shift]:
                port, path, body, pid = targets[name]
                runs[name].append(h2load(f"{name} #{round_number + 1}", port, path, body, workdir, pid))
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
        if len(SERVERS) > 1:
            best = max(SERVERS, key=lambda m: median[f"{m} translate"].rps)
            others = sorted(SERVERS, key=lambda m: m != best)
            lines.append(
                f"faster unary Translate: {best} ("
                + " vs ".join(f"{m} {median[f'{m} translate'].rps:.0f}" for m in others)
                + " RPS)"
            )
        failed = sum(r.failed for results in runs.values() for r in results)
        lines.append(f"h2load failed requests: {failed}")
    finally:
        for server in servers:
            server.stop()
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--empty-server":
        empty_server(int(sys.argv[2]), sys.argv[3])
    else:
        raise SystemExit(main())
