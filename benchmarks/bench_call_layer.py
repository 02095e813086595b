"""The per-method call layer's cost on grpc.aio: `python -m benchmarks.bench_call_layer` (`make bench`).

Starts a redis-server, an OTLP trace receiver in this process and binding server processes on CPU 0:
  layer     `python -m numprotect.services.binding`: the real bootstrap, every call through the call layer;
  raw       this module's `serve_raw`: the same servicer (built by binding's own `build`) on a bare grpc.aio server,
            each handler registered as grpc made it, wrapped only in what any server must do (an exception becomes
            its status: `calls.status_for`, then `context.abort`);
  baseline  with BENCH_BASELINE=<tree> (a copy of libs/, services/, gen/): the layer server run from that tree
            (first on PYTHONPATH), to compare two versions of the layer in one run.
All run with tracing at its deployed default (an OTLP endpoint, parentbased_traceidratio 0.01; BENCH_TRACING=off:
none), plaintext without identity checks, or with NUMPROTECT_BENCH_SECURED=1 TLS on all and, on the layer
servers, a tenant's bearer token checked on every call (the raw server has no layer, so no identity).
This process drives them from CPU 1 (grpc.aio on uvloop, BENCH_CONCURRENCY=64 calls in flight) in BENCH_ROUNDS (5)
interleaved rounds (rotated order) of BENCH_SECONDS (4) per target; BENCH_KINDS picks among:
  health        grpc.health.v1.Health/Check (the yardstick of issue 17's ratios; never wrapped by the layer);
  get_invalid   BindingService/GetBinding with a malformed binding_id: INVALID_ARGUMENT from the servicer's first
                line, no Redis (the layer's whole per-call work plus the error path's status with details);
  get_missing   GetBinding of a well-formed id that does not exist: NOT_FOUND after one Redis read.
BENCH_SERVICE=allocation measures allocation instead (plaintext): GetNumber of a malformed / an unknown number.
Reports per target the server's CPU per call (user + sys from /proc, summed over the rounds), its median over the
rounds, calls/s, and each layer server's cost: it minus raw per kind of call. Every call must end with the code
its kind expects (checked: any other outcome fails the run).

BENCH_MODE=write (plaintext): instead, an allocation and a binding process of this tree and, with BENCH_BASELINE,
of that tree, on one Redis, and interleaved rounds of Health/Check and CreateBinding (bench_binding's workload)
against each binding: the CPU per create of binding, allocation and Redis, per build. BENCH_SHARED_ALLOCATION=1:
both bindings call this tree's allocation (then only the bindings, and how they call allocation, differ).

BENCH_PROFILE=<file.raw> then runs get_invalid on the layer server (write mode: creates on this tree's binding)
for BENCH_PROFILE_SECONDS (15) under `py-spy record --format raw -r 200` and writes the raw stacks there.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from benchmarks.bench_tracing import SpanCounter
from benchmarks.binding_stack import Credentials, _secure
from benchmarks.harness import cpu_seconds, free_port, process, redis_server_args, wait_redis, wait_serving
from benchmarks.load import run_for
from numprotect.allocation.v1 import allocation_pb2, allocation_pb2_grpc
from numprotect.binding.v1 import binding_pb2 as pb
from numprotect.binding.v1 import binding_pb2_grpc
from numprotect.core.identity.principal import Role
from numprotect.core.metrics import Metrics

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
SECONDS = float(os.environ.get("BENCH_SECONDS", "4"))
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "64"))
SECURED = os.environ.get("NUMPROTECT_BENCH_SECURED", "0") == "1"
PROFILE = os.environ.get("BENCH_PROFILE", "")
PROFILE_SECONDS = int(os.environ.get("BENCH_PROFILE_SECONDS", "15"))
TRACING = os.environ.get("BENCH_TRACING", "default")
MODE = os.environ.get("BENCH_MODE", "layer")  # or "write": see write_path_ab
# Write mode: both bindings call this tree's allocation (what differs is then only how each binding calls it).
SHARED_ALLOCATION = os.environ.get("BENCH_SHARED_ALLOCATION", "0") == "1"
# A source tree (with libs/, services/, gen/) whose call layer to compare in the same run, as the server "baseline".
BASELINE = os.environ.get("BENCH_BASELINE", "")
TENANT = "bench-tenant"
# The service measured in layer mode: binding (GetBinding) or allocation (GetNumber; plaintext only).
SERVICE = os.environ.get("BENCH_SERVICE", "binding")
SERVERS = ("layer", "raw", *(("baseline",) if BASELINE else ()))
EXPECTED = {"health": "OK", "get_invalid": "INVALID_ARGUMENT", "get_missing": "NOT_FOUND"}
KINDS = {kind: EXPECTED[kind] for kind in os.environ.get("BENCH_KINDS", ",".join(EXPECTED)).split(",")}
SERVER_CPU, CLIENT_CPU = "0", "1"
BINDING_SERVICE = "numprotect.binding.v1.BindingService"


def tree_path(tree: str) -> str:
    """PYTHONPATH that runs the services from `tree`: first on sys.path, before the editable install's trees."""
    return ":".join(str(Path(tree) / part) for part in ("libs", "services", "gen"))


class SpansByName(SpanCounter):
    """The trace receiver, also counting spans per service and span name (e.g. allocation's batch calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_name: dict[tuple[str, str], int] = {}

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802
        for resource_spans in request.resource_spans:
            service = next(
                (kv.value.string_value for kv in resource_spans.resource.attributes if kv.key == "service.name"), ""
            )
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    key = (service, span.name)
                    self.by_name[key] = self.by_name.get(key, 0) + 1
        return super().Export(request, context)


# --- the raw server ----------------------------------------------------------------------------------------------


class _Captured:
    """Stands in for a server in a generated `add_..._to_server`: keeps the method handlers it registers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}
        self.service = ""

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.service = service
        self.handlers.update(handlers)


def _mapped(behavior: Callable[..., Awaitable[Any]], path: str) -> Callable[..., Awaitable[Any]]:
    """The least a server does around a handler: an exception ends the call with its status."""
    from numprotect.core.calls import status_for

    async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await behavior(request, context)
        except Exception as exc:
            status = status_for(exc, path)
        await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)

    return handler


async def serve_raw() -> None:
    """The service's servicers, built by its own builder, on a bare grpc.aio server (no call layer)."""
    import importlib

    from numprotect.core.identity.api_keys import AuthSettings
    from numprotect.core.identity.runtime import Identity
    from numprotect.core.redis_client import create_redis
    from numprotect.core.server import Runtime, server_options
    from numprotect.core.settings import Env, RedisSettings, ServerSettings
    from numprotect.core.telemetry import Telemetry
    from numprotect.core.tls import TlsSettings, server_credentials

    build = importlib.import_module(f"numprotect.services.{SERVICE}.app").build

    environ = dict(os.environ)
    env = Env(environ)
    settings = ServerSettings.from_env(env, SERVICE)
    redis_settings = RedisSettings.from_env(env)
    tls = TlsSettings.from_env(env)
    identity = Identity(AuthSettings.from_env(env), redis_settings)
    runtime = Runtime(
        env,
        settings,
        create_redis(redis_settings),
        Telemetry.from_env(environ, f"numprotect-{SERVICE}-raw"),
        redis_settings,
        tls=tls,
        identity=identity,
        metrics=Metrics(SERVICE),
    )
    parts = await build(runtime)
    server = grpc.aio.server(options=server_options(settings))
    for registration in parts.registrations:
        captured = _Captured()
        registration.add_to_server(registration.servicer, captured)
        handlers = {}
        for name, handler in captured.handlers.items():
            if handler.unary_unary is None:  # streams: as registered (the bench calls unary methods only)
                handlers[name] = handler
                continue
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                _mapped(handler.unary_unary, f"/{captured.service}/{name}"),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(captured.service, handlers),))
        server.add_registered_method_handlers(captured.service, handlers)  # type: ignore[attr-defined]
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"127.0.0.1:{settings.port}"
    server.add_secure_port(address, server_credentials(tls)) if tls.enabled else server.add_insecure_port(address)
    if settings.health_port:  # readiness in plaintext, as the layer server's NUMPROTECT_HEALTH_PORT
        server.add_insecure_port(f"127.0.0.1:{settings.health_port}")
    await server.start()
    print("serving raw", flush=True)
    await server.wait_for_termination()


# --- the bench ---------------------------------------------------------------------------------------------------


@dataclass
class Target:
    server: str
    kind: str
    calls: int = 0
    cpu: float = 0.0
    seconds: float = 0.0
    per_round_us: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.server}/{self.kind}"

    @property
    def us_per_call(self) -> float:
        return self.cpu / max(1, self.calls) * 1e6


def channel(address: str, credentials: Credentials | None) -> grpc.aio.Channel:
    if credentials is None:
        return grpc.aio.insecure_channel(address)
    token = grpc.access_token_call_credentials(credentials.tokens[Role.TENANT])
    ssl = grpc.ssl_channel_credentials(root_certificates=credentials.ca)
    return grpc.aio.secure_channel(address, grpc.composite_channel_credentials(ssl, token))


def caller(kind: str, chan: grpc.aio.Channel) -> Callable[[int], Awaitable[Any]]:
    if kind == "health":
        check = health_pb2_grpc.HealthStub(chan).Check
        request = health_pb2.HealthCheckRequest()
        return lambda i: check(request, timeout=10)
    if SERVICE == "allocation":
        get_number = allocation_pb2_grpc.AllocationServiceStub(chan).GetNumber
        number = "not-a-number" if kind == "get_invalid" else "700999900000000"
        request = allocation_pb2.GetNumberRequest(virtual_number=number)
        return lambda i: get_number(request, timeout=10)
    get = binding_pb2_grpc.BindingServiceStub(chan).GetBinding
    binding_id = "not-a-binding-id" if kind == "get_invalid" else "b" + "0" * 22
    message = pb.GetBindingRequest(binding_id=binding_id, tenant_id=TENANT)
    return lambda i: get(message, timeout=10)


@contextmanager
def profiled(pid: int) -> Iterator[None]:
    """py-spy records `pid` for PROFILE_SECONDS while the block runs (raw stacks written to BENCH_PROFILE)."""
    command = [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pid), "--format", "raw", "-r", "200"]
    profiler = subprocess.Popen(
        [*command, "-d", str(PROFILE_SECONDS), "-o", PROFILE], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield
    finally:
        profiler.wait(timeout=60)


async def measure(target: Target, call: Callable[[int], Awaitable[Any]], pid: int, seconds: float) -> None:
    before = cpu_seconds(pid)
    outcome, elapsed = await run_for(seconds, CONCURRENCY, call)
    used = cpu_seconds(pid) - before
    expected = KINDS[target.kind]
    got = {"OK": outcome.ok, **outcome.errors} if outcome.ok else dict(outcome.errors)
    if set(got) != {expected}:
        raise RuntimeError(f"{target.name}: expected only {expected}, got {got} ({outcome.first_error})")
    target.calls += outcome.calls
    target.cpu += used
    target.seconds += elapsed
    target.per_round_us.append(used / max(1, outcome.calls) * 1e6)


async def drive(addresses: dict[str, str], pids: dict[str, int], credentials: Credentials | None) -> list[Target]:
    import uvloop

    del uvloop  # installed by the caller; imported here only to fail early without it
    channels = {server: channel(address, credentials) for server, address in addresses.items()}
    targets = [Target(server, kind) for kind in KINDS for server in SERVERS]
    calls = {t.name: caller(t.kind, channels[t.server]) for t in targets}
    for target in targets:  # warm-up: connections, first calls, the server's caches
        await run_for(1.0, CONCURRENCY, calls[target.name])
    for round_number in range(ROUNDS):
        shift = round_number % len(targets)
        for target in targets[shift:] + targets[:shift]:
            await measure(target, calls[target.name], pids[target.server], SECONDS)
        print(f"round {round_number + 1}/{ROUNDS} done", file=sys.stderr, flush=True)
    if PROFILE:
        with profiled(pids["layer"]):
            await run_for(PROFILE_SECONDS + 2, CONCURRENCY, calls["layer/get_invalid"])
    for chan in channels.values():
        await chan.close(None)
    return targets


def report(targets: list[Target], security: str) -> None:
    tracing = {"default": "deployed default (1 %)", "off": "off"}.get(TRACING, TRACING)
    print(f"call layer on grpc.aio: {SERVICE} server CPU per call, {security}; tracing: {tracing}")
    print(f"{ROUNDS} rounds x {SECONDS:g}s per target, {CONCURRENCY} calls in flight; load {os.getloadavg()[0]:.1f}")
    print(f"{'target':24} {'calls/s':>9} {'us/call':>9} {'median':>9}  per round")
    by_name = {t.name: t for t in targets}
    for t in targets:
        rounds = " ".join(f"{v:.0f}" for v in t.per_round_us)
        rate = t.calls / max(t.seconds, 1e-9)
        median = statistics.median(t.per_round_us)
        print(f"{t.name:24} {rate:9.0f} {t.us_per_call:9.0f} {median:9.0f}  {rounds}")
    for server in [s for s in SERVERS if s != "raw"]:
        print(f"{server}'s cost ({server} - raw, us of server CPU per call; median of per-round differences):")
        for kind in KINDS:
            layer, raw = by_name[f"{server}/{kind}"], by_name[f"raw/{kind}"]
            diffs = [a - b for a, b in zip(layer.per_round_us, raw.per_round_us, strict=True)]
            print(f"  {kind:12} {layer.us_per_call - raw.us_per_call:6.0f} (median {statistics.median(diffs):.0f})")
        if f"{server}/health" not in by_name:
            continue
        health_us = by_name[f"{server}/health"].us_per_call
        for kind in [k for k in KINDS if k != "health"]:
            units = by_name[f"{server}/{kind}"].us_per_call / health_us
            print(f"  {server}/{kind} in {server}/health units: {units:.2f}")


# --- BENCH_MODE=write: CreateBinding of this tree against BENCH_BASELINE's, in the same run ---------------------


@dataclass
class Build:
    """One build's allocation and binding processes, and what its phases used."""

    name: str  # "current" or "baseline"
    binding_address: str
    pids: dict[str, int]  # "binding", "allocation"
    calls: dict[str, int] = field(default_factory=dict)  # by phase
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> process (and "Redis") -> seconds
    rounds: dict[str, list[float]] = field(default_factory=dict)  # phase -> the sum's us per call in each round
    errors: dict[str, int] = field(default_factory=dict)  # "<phase> <code>" -> calls (CPU is per successful call)


async def drive_writes(builds: list[Build], redis_client: Any, allocation_address: str) -> None:
    from benchmarks.bench_binding import Workload, import_blocks
    from benchmarks.binding_stack import Stack
    from benchmarks.load import redis_cpu_seconds

    stack = Stack("", allocation_address, redis_client, 0, {}, None)
    await import_blocks(stack)
    workloads = {}
    for index, build in enumerate(builds):
        workload = Workload([grpc.aio.insecure_channel(build.binding_address) for _ in range(4)])
        workload.orders = workload.parties = index * 10_000_000  # distinct orders and parties per build
        workloads[build.name] = workload
        await run_for(1.0, CONCURRENCY, workload.check)
        await run_for(1.0, CONCURRENCY, workload.create)
    phases = [(build, phase) for phase in ("health", "create") for build in builds]
    for round_number in range(ROUNDS):
        shift = round_number % len(phases)
        for build, phase in phases[shift:] + phases[:shift]:

            def sample(build: Build = build) -> dict[str, float]:
                used = {name: cpu_seconds(pid) for name, pid in build.pids.items()}
                return {**used, "Redis": redis_cpu_seconds(redis_client)}

            before = sample()
            outcome, _ = await run_for(SECONDS, CONCURRENCY, workloads[build.name].call(phase))
            after = sample()
            for code, count in outcome.errors.items():  # under load a create may time out: counted, not fatal
                build.errors[f"{phase} {code}"] = build.errors.get(f"{phase} {code}", 0) + count
            build.calls[phase] = build.calls.get(phase, 0) + outcome.ok
            totals = build.cpu.setdefault(phase, dict.fromkeys(after, 0.0))
            for name in after:
                totals[name] += after[name] - before[name]
            spent = after["binding"] - before["binding"]
            if phase == "create":
                spent = sum(after[name] - before[name] for name in after)
            build.rounds.setdefault(phase, []).append(spent / max(1, outcome.ok) * 1e6)
        print(f"round {round_number + 1}/{ROUNDS} done", file=sys.stderr, flush=True)
    if PROFILE:  # the current build's binding server during creates
        with profiled(builds[0].pids["binding"]):
            await run_for(PROFILE_SECONDS + 2, CONCURRENCY, workloads[builds[0].name].create)


def report_writes(builds: list[Build]) -> None:
    print("CreateBinding, this tree against BENCH_BASELINE's call layer (same run, interleaved rounds; plaintext,")
    tracing = {"default": "deployed default (1 %)", "off": "off"}.get(TRACING, TRACING)
    print(f"tracing: {tracing}); {ROUNDS} rounds x {SECONDS:g}s,")
    print(f"{CONCURRENCY} calls in flight; load {os.getloadavg()[0]:.1f}; us of CPU per call")
    for build in builds:
        health = build.cpu["health"]["binding"] / build.calls["health"] * 1e6
        create = {name: used / build.calls["create"] * 1e6 for name, used in build.cpu["create"].items()}
        total = sum(create.values())
        parts = ", ".join(f"{name} {us:.0f}" for name, us in create.items())
        print(f"{build.name:9} Health/Check {health:.0f} (binding); CreateBinding {total:.0f} = {parts}")
        print(f"          {total / health:.2f} x health; per round (sum): ", end="")
        print(" ".join(f"{us:.0f}" for us in build.rounds["create"]), f"; failed calls: {build.errors or 'none'}")


def write_path_ab(workdir: Path, redis_client: Any, common: dict[str, str], receiver: SpansByName) -> int:
    trees = {"current": None, **({"baseline": BASELINE} if BASELINE else {})}
    builds: list[Build] = []
    allocation_address = ""
    with ExitStack() as stack:
        for name, tree in trees.items():
            allocation_port, binding_port = free_port(), free_port()
            env = {
                **common,
                "NUMPROTECT_ALLOCATION_PORT": str(allocation_port),
                "NUMPROTECT_BINDING_PORT": str(binding_port),
                "NUMPROTECT_ALLOCATION_ADDR": f"127.0.0.1:{allocation_port}",
            }
            if tree is not None:
                env["PYTHONPATH"] = tree_path(tree)
            pids = {}
            services: tuple[tuple[str, int], ...] = (("allocation", allocation_port), ("binding", binding_port))
            if SHARED_ALLOCATION and builds:  # the first build's allocation serves this binding too
                env["NUMPROTECT_ALLOCATION_ADDR"] = allocation_address
                pids["allocation"] = builds[0].pids["allocation"]
                services = services[1:]
            for service, port in services:
                env["OTEL_SERVICE_NAME"] = f"bench-{name}-{service}"
                log = workdir / f"{name}-{service}.log"
                child = stack.enter_context(process([sys.executable, "-m", f"numprotect.services.{service}"], env, log))
                wait_serving(f"127.0.0.1:{port}", child, log)
                pids[service] = child.pid
            allocation_address = allocation_address or f"127.0.0.1:{allocation_port}"
            builds.append(Build(name, f"127.0.0.1:{binding_port}", pids))
        import uvloop

        uvloop.run(drive_writes(builds, redis_client, allocation_address))
    report_writes(builds)
    time.sleep(6)  # the last spans leave (the batch span processor exports every 5 s)
    print("sampled spans received, whole run (warm-up included): creates, and allocation's calls by method")
    for build in builds:
        creates = receiver.by_name.get((f"bench-{build.name}-binding", f"/{BINDING_SERVICE}/CreateBinding"), 0)
        calls = {
            name.rsplit("/", 1)[1]: n
            for (service, name), n in receiver.by_name.items()
            if service == f"bench-{build.name}-allocation" and name.startswith("/numprotect.allocation.")
        }
        print(f"  {build.name}: {creates} creates; allocation's SERVER spans {calls}")
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "serve-raw":
        import uvloop

        uvloop.run(serve_raw())
        return 0
    redis_binary = shutil.which("redis-server")
    if redis_binary is None:
        print("redis-server not found: run `make system-deps`", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {int(CLIENT_CPU)})
    workdir = Path(tempfile.mkdtemp(prefix="numprotect-bench-call-layer-"))
    receiver = SpansByName()
    try:
        with ExitStack() as stack:
            redis_port = free_port()
            stack.enter_context(process(redis_server_args(redis_binary, redis_port, workdir), {}, workdir / "r.log"))
            redis_client = wait_redis(redis_port)
            common = {
                **{k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "NUMPROTECT_"))},
                "NUMPROTECT_TLS": "off",
                "NUMPROTECT_AUTH": "off",
                "NUMPROTECT_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                "NUMPROTECT_LOG_LEVEL": "WARNING",
                "NUMPROTECT_ALLOCATION_ADDR": f"127.0.0.1:{free_port()}",  # never called by these RPCs
            }
            if TRACING != "off":  # "default"; or a sampler's name, e.g. always_on to count every call's span
                common["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{receiver.port}"
                if TRACING != "default":
                    common["OTEL_TRACES_SAMPLER"] = TRACING
            if MODE == "write":
                return write_path_ab(workdir, redis_client, common, receiver)
            credentials = None
            binding_only: dict[str, str] = {}
            if SECURED:
                secure_env, binding_only, credentials = _secure(workdir, redis_client, TENANT)
                del common["NUMPROTECT_AUTH"]
                common.update(secure_env)
            commands = {
                "layer": [sys.executable, "-m", f"numprotect.services.{SERVICE}"],
                "raw": [sys.executable, "-m", "benchmarks.bench_call_layer", "serve-raw"],
                "baseline": [sys.executable, "-m", f"numprotect.services.{SERVICE}"],
            }
            addresses, pids = {}, {}
            for server in SERVERS:
                port, ready = free_port(), None
                env = {**common, **binding_only, f"NUMPROTECT_{SERVICE.upper()}_PORT": str(port)}
                env["OTEL_SERVICE_NAME"] = f"bench-{server}"
                if server == "raw":  # no layer: the servicer's callers let everyone by (its tenant from the request)
                    env["NUMPROTECT_AUTH"] = "off"
                    env.pop("NUMPROTECT_AUTH_KEY_FILE", None)
                if server == "baseline":
                    env["PYTHONPATH"] = tree_path(BASELINE)
                if SECURED:
                    env["NUMPROTECT_HEALTH_PORT"] = str(free_port())
                    ready = f"127.0.0.1:{env['NUMPROTECT_HEALTH_PORT']}"
                log = workdir / f"{server}.log"
                child = stack.enter_context(process(["taskset", "-c", SERVER_CPU, *commands[server]], env, log))
                addresses[server], pids[server] = f"127.0.0.1:{port}", child.pid
                wait_serving(ready or addresses[server], child, log)
            import uvloop

            security = "TLS + tenant token on the layer server" if SECURED else "plaintext, no identity checks"
            targets = uvloop.run(drive(addresses, pids, credentials))
            report(targets, security)
            spans = {server: receiver.count(f"bench-{server}") for server in SERVERS}
            print(f"spans received so far (1 % sampled, exported every 5 s): {spans}")
    finally:
        receiver.server.stop(None)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
