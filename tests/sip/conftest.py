"""The SIP stack the SIPp (and Kamailio) tests run against: real Redis, the real translation service, the real
adapter, and bindings written the way the binding service writes them.

    async def test_x(sip_stack: SipStack) -> None:                 # default settings
        binding = await sip_stack.bind_axb(A, B)                    # on X, carrier CARRIER routes its block
        result = await sip_stack.sipp.run("axb.xml", rows=[[A, X, B, X, sip_stack.egress]])  # its CSV columns
        result.check(calls=1)                                       # SIPp exited 0, 1 call succeeded

    async def test_y(sip_stack_factory: SipStackFactory) -> None:   # own settings
        async with sip_stack_factory(adapter={"NUMPROTECT_SIP_TRANSLATE_TIMEOUT": "5s"}) as stack: ...

What runs, all on loopback with the test PKI's TLS and API keys (tests/support/inprocess.py):
- translation in-process (`running_sync_service`), on the test's Redis (`redis_env`: standalone or cluster);
- a `LatencyProxy` (tests/support/tcp_proxy.py) between the adapter and translation: `translation_delay(s)` slows
  every answer by s each way (CANCEL before the final response, 503 past the deadline), `translation_down()`
  drops it for good (503 at once);
- the adapter in-process through its own build function (`numprotect.services.sip.app.build`, the bootstrap's
  `running_service`; `sip_adapter` is the started SipAdapter), SIP on UDP and TCP 127.0.0.1:<port the OS chose>
  (`sip_port`), its credential a token of carrier CARRIER in NUMPROTECT_SERVICE_TOKEN_FILE, NUMPROTECT_SIP_EGRESS
  = `egress`; the stack is yielded once the adapter is ready (a translation stream up). `start_adapter_process()`
  runs another adapter as a real process on the same translation, for tests that need a process (signals, its
  log), returned once its health says SERVING;
- bindings: `bind_axb` / `bind_axe` write the binding record (committed), the number's history and its routes
  through numprotect.core's shared writers (BindingRecordStore, RouteTable), as the binding service does, so
  translation connects the call and a CDR carrying the 302's call_ref matches the binding; CARRIER routes the
  number's block. `lock(X)` locks a number as allocation's LockNumber does; `block_caller(n)` puts a caller on
  the global (or a tenant's) blocklist and waits until translation enforces it.
- `translations()`: translation's own count of answered calls (numprotect_translation_decisions_total), to prove
  how many translations SIP traffic caused; `adapter_metric(name, labels)` reads the adapter's registry.
- `sipp`: a `support.sipp.Sipp` aimed at the adapter, tracing under the test's tmp_path.

Each test gets its own stack (ports 0, its own tmp_path, Redis emptied), so tests are safe under pytest-xdist.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from numprotect.core.binding_records import BindingRecord, BindingRecordStore
from numprotect.core.identity.principal import Role
from numprotect.core.redis_client import RedisClient, create_redis
from numprotect.core.routes import MODE_AXB, MODE_AXE, RESTRICTION_NONE, Route, RouteTable, lock_key
from numprotect.core.server import AioServiceApp, Runtime, SyncRuntime, SyncServiceApp
from numprotect.core.settings import Env, RedisSettings
from numprotect.services.sip.app import SipAdapter, build
from numprotect.services.translation.app import build_sync
from numprotect.translation.v1 import translation_pb2, translation_pb2_grpc
from support.inprocess import RunningService, running_service, running_sync_service
from support.processes import ServiceProcess
from support.sipp import Sipp
from support.tcp_proxy import LatencyProxy

X = "700100000000001"  # the virtual number of the tests (its block routed by CARRIER)
X2 = "700100000000002"
A = "13800000001"
B = "13900000002"
STRANGER = "13700000003"
CARRIER = "cm"  # the carrier the adapter's token belongs to
# Where the 302 sends calls: TEST-NET-2, never reached by these tests (H5's Kamailio test passes its own).
EGRESS = "198.51.100.7:5070"

# Fast blocklist refresh and limits no test reaches, so a test sees each effect at once and never a rate limit.
TRANSLATION_SETTINGS = {
    "NUMPROTECT_TRANSLATION_RATE_WINDOW": "60s",
    "NUMPROTECT_TRANSLATION_RATE_PER_CALLER": "100000",
    "NUMPROTECT_TRANSLATION_RATE_PER_BINDING": "100000",
    "NUMPROTECT_TRANSLATION_BLOCKLIST_REFRESH": "100ms",
}
ADAPTER_SETTINGS = {
    "NUMPROTECT_SIP_HOST": "127.0.0.1",
    "NUMPROTECT_SIP_PORT": "0",
    "NUMPROTECT_SIP_GRPC_PORT": "0",
    "NUMPROTECT_SIP_TRANSLATE_TIMEOUT": "2s",  # generous on a loaded 2-core host; the deadline tests set theirs
}
START_SECONDS = 30.0
# The fields a binding's record shares with its route, under the same names.
_ROUTE_FIELDS_IN_RECORD = (
    "binding_id",
    "tenant_id",
    "mode",
    "party_a",
    "party_b",
    "call_restriction",
    "recording_enabled",
    "allow_any_caller",
    "expire_ms",
)


@dataclass(frozen=True)
class Binding:
    """A binding as the tests made it: its record, and where it routes."""

    record: BindingRecord
    route: Route
    number: str
    extension: str

    @property
    def binding_id(self) -> str:
        return self.record.binding_id


@dataclass
class SipStack:
    translation: RunningService[SyncServiceApp, SyncRuntime]
    adapter: RunningService[AioServiceApp, Runtime]
    sip_adapter: SipAdapter  # the adapter object itself (handler, server, translation client)
    sip_port: int
    egress: str
    proxy: LatencyProxy
    redis: RedisClient
    redis_env: dict[str, str]
    # The adapter's environment (without the bootstrap's test additions): start_adapter_process reuses it.
    adapter_environ: dict[str, str]
    tmp_path: Path
    sipp: Sipp
    _processes: list[ServiceProcess] = field(default_factory=list)

    @property
    def sip_address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.sip_port)

    # --- bindings, locks, blocklists -------------------------------------------------------------------------

    def route_blocks(self, *numbers: str, carrier_id: str = CARRIER) -> None:
        """Records `carrier_id` as the carrier routing the numbers' blocks, loaded by translation at once."""
        self.translation.route(carrier_id, *numbers)

    async def bind_axb(
        self,
        party_a: str = A,
        party_b: str = B,
        *,
        number: str = X,
        restriction: int = RESTRICTION_NONE,
        **options: Any,
    ) -> Binding:
        """An AXB binding on `number`: A calling it reaches B, B calling it reaches A. Options: binding_id,
        tenant_id ("t1"), recording (False), ttl_ms (1 h)."""
        return await self._bind(MODE_AXB, party_a, party_b, number, "", restriction=restriction, **options)

    async def bind_axe(
        self, party_a: str = A, party_b: str = B, extension: str = "1234", *, number: str = X, **options: Any
    ) -> Binding:
        """An AXE binding on `number` + `extension`: a call without the extension is asked for it (484). Options as
        bind_axb, and allow_any_caller (False)."""
        return await self._bind(MODE_AXE, party_a, party_b, number, extension, **options)

    async def _bind(
        self,
        mode: int,
        party_a: str,
        party_b: str,
        number: str,
        extension: str,
        *,
        binding_id: str = "",
        tenant_id: str = "t1",
        recording: bool = False,
        restriction: int = RESTRICTION_NONE,
        allow_any_caller: bool = False,
        ttl_ms: int = 3_600_000,
    ) -> Binding:
        """Writes the committed record, the number's history entry and the routes, as the binding service's create
        does (numprotect.core's writers), then has CARRIER route the number's block."""
        now = time.time_ns() // 1_000_000
        route = Route(
            binding_id=binding_id or f"sip-{uuid.uuid4().hex[:12]}",  # unique in the test's Redis
            tenant_id=tenant_id,
            mode=mode,
            party_a=party_a,
            party_b=party_b,
            call_restriction=restriction,
            recording_enabled=recording,
            allow_any_caller=allow_any_caller,
            expire_ms=now + ttl_ms,
        )
        record = BindingRecord(
            out_order_id=f"order-{route.binding_id}",
            virtual_number=number,
            extension=extension,
            city_code="010",
            user_consent=True,
            create_ms=now,
            update_ms=now,
            delete_ms=0,
            **{name: getattr(route, name) for name in _ROUTE_FIELDS_IN_RECORD},
        )
        store = BindingRecordStore(self.redis)
        assert await store.create(record, reservation_id=f"r-{route.binding_id}", city_fallback=False)
        assert await store.activate(route.binding_id, record.end_ms(), expire_ms=record.expire_ms)
        await RouteTable(self.redis).put(number, route, extension, history=store.history(number, record.end_ms()))
        self.route_blocks(number)
        return Binding(record, route, number, extension)

    async def lock(self, number: str = X, reason: str = "fraud report") -> None:
        """Locks `number` as allocation's LockNumber does: translation rejects every call (NUMBER_LOCKED)."""
        await self.redis.set(lock_key(number), reason)

    async def unlock(self, number: str = X) -> None:
        await self.redis.delete(lock_key(number))

    async def block_caller(self, caller: str, *, tenant_id: str = "", called: str = X, within: float = 10.0) -> None:
        """Puts `caller` on the global blocklist (or `tenant_id`'s) through BlockCaller as the operator, then waits
        until translation rejects its calls to `called` (the blocklist refresh). The wait's probes are unary
        Translate calls: they count in `translations()`."""
        operator = translation_pb2_grpc.TranslationServiceStub(self.translation.channel_as(Role.OPERATOR))
        request = translation_pb2.BlockCallerRequest(tenant_id=tenant_id, calling_number=caller, reason="sipp test")
        await operator.BlockCaller(request)
        carrier = translation_pb2_grpc.TranslationServiceStub(self.translation.channel_as(Role.CARRIER, CARRIER))
        probe = translation_pb2.TranslateRequest(calling_number=caller, called_number=called, call_id="block-probe")
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            reply = await carrier.Translate(probe, timeout=5)
            if reply.reject_reason == translation_pb2.REJECT_REASON_CALLER_BLOCKED:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"translation did not enforce the block of {caller} within {within}s")

    # --- translation's reachability ------------------------------------------------------------------------

    def translation_delay(self, seconds: float) -> None:
        """Delays every chunk between the adapter and translation by `seconds` each way (0: no delay)."""
        self.proxy.delay = seconds

    def translation_down(self) -> None:
        """Drops the adapter's connections to translation and refuses new ones, for the rest of the test."""
        self.proxy.close()

    # --- what the services counted ---------------------------------------------------------------------------

    def translations(self) -> float:
        """Calls translation answered so far (numprotect_translation_decisions_total, every decision and reason):
        translation's own count, not the adapter's."""
        return _sum_samples(self.translation.runtime.metrics.registry, "numprotect_translation_decisions_total")

    def adapter_metric(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        """The adapter's sample `name` (e.g. numprotect_sip_responses_total) with `labels`, 0 when absent."""
        value = self.adapter.runtime.metrics.registry.get_sample_value(name, dict(labels or {}))
        return value or 0.0

    # --- another adapter, as a process ----------------------------------------------------------------------

    async def start_adapter_process(self, settings: Mapping[str, str] | None = None) -> tuple[ServiceProcess, int]:
        """Starts `python -m numprotect.services.sip` on the same translation (through the proxy), stopped with the
        stack, once ready (its health SERVING: a translation stream up); returns it and its SIP port (read from its
        ready line). Off the event loop: the in-process services
        keep serving meanwhile."""
        return await asyncio.to_thread(self._start_adapter_process, settings or {})

    def _start_adapter_process(self, settings: Mapping[str, str]) -> tuple[ServiceProcess, int]:
        env = {**self.adapter_environ, **settings, "NUMPROTECT_SIP_GRPC_PORT": "0"}
        process = ServiceProcess("sip", env, timeout=START_SECONDS)
        self._processes.append(process)
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            port = _sip_port_in(process.lines)
            if port:
                process.wait_serving(START_SECONDS)  # readiness: a translation stream is up
                return process, port
            time.sleep(0.05)
        raise RuntimeError("the adapter process logged no SIP port:\n" + "\n".join(process.lines[-30:]))


def _sum_samples(registry: CollectorRegistry, sample_name: str) -> float:
    return sum(sample.value for metric in registry.collect() for sample in metric.samples if sample.name == sample_name)


def _sip_port_in(lines: list[str]) -> int:
    """The SIP port an adapter process logged in its ready line ("sip listening"), 0 when not yet logged."""
    for line in lines:
        if '"msg": "sip listening"' in line:
            return int(json.loads(line)["sip_port"])
    return 0


@asynccontextmanager
async def _running_adapter(
    environ: Mapping[str, str],
) -> AsyncIterator[tuple[RunningService[AioServiceApp, Runtime], SipAdapter]]:
    """The adapter in-process through its build function, which hands over the started adapter (its port)."""
    started: list[SipAdapter] = []
    async with running_service("sip", functools.partial(build, started=started.append), environ) as adapter:
        yield adapter, started[0]


async def _ready(adapter: SipAdapter, within: float = START_SECONDS) -> None:
    """Waits until the adapter is ready (a translation stream open): it starts its streams without waiting."""
    deadline = time.monotonic() + within
    while not adapter.ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the adapter was not ready (no translation stream) within {within}s")
        await asyncio.sleep(0.02)


class FakeTranslator:
    """Stands in for TranslationClient in the handler and listener tests (the SIPp tests run the real one):
    answers `answer` to each call (recorded in `calls`) once `release` is set (at once by default); `up` is
    what readiness and OPTIONS see."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls: list[Any] = []
        self.release = asyncio.Event()
        self.release.set()
        self.up = True
        self._tasks: set[asyncio.Task[Any]] = set()  # the loop holds tasks weakly: keep each until it is done

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def translate(self, call: Any) -> Any:
        self.calls.append(call)
        await self.release.wait()
        return self.answer

    def submit(self, call: Any, done: Callable[[Any], None]) -> None:
        task = asyncio.ensure_future(self.translate(call))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda answered: done(answered.result()))


@pytest.fixture
def fake_translator() -> type[FakeTranslator]:
    """The FakeTranslator class (test modules cannot import conftest): `fake_translator(answer)`."""
    return FakeTranslator


SipStackFactory = Callable[..., AbstractAsyncContextManager[SipStack]]


@pytest.fixture
def sip_stack_factory(redis_env: dict[str, str], tmp_path: Path) -> SipStackFactory:
    """`async with sip_stack_factory(adapter={...}, translation={...}, egress=...) as stack:` a stack whose
    adapter and translation take these environment settings over the defaults (ADAPTER_SETTINGS,
    TRANSLATION_SETTINGS)."""

    @asynccontextmanager
    async def start(
        *,
        adapter: Mapping[str, str] | None = None,
        translation: Mapping[str, str] | None = None,
        egress: str = EGRESS,
    ) -> AsyncIterator[SipStack]:
        async with contextlib.AsyncExitStack() as stack:
            translation_env = {**redis_env, **TRANSLATION_SETTINGS, **(translation or {})}
            service = await stack.enter_async_context(running_sync_service("translation", build_sync, translation_env))
            proxy = LatencyProxy("127.0.0.1", service.port)
            stack.callback(proxy.close)
            redis = create_redis(RedisSettings.from_env(Env(redis_env)))
            stack.push_async_callback(redis.aclose)
            token_file = tmp_path / "sip-carrier.token"
            token_file.write_text(service.token(Role.CARRIER, CARRIER))
            token_file.chmod(0o600)
            adapter_env = {
                **redis_env,
                **ADAPTER_SETTINGS,
                "NUMPROTECT_TRANSLATION_ADDR": proxy.address,
                "NUMPROTECT_SERVICE_TOKEN_FILE": str(token_file),
                "NUMPROTECT_SIP_EGRESS": egress,
                **(adapter or {}),
            }
            running, sip_adapter = await stack.enter_async_context(_running_adapter(adapter_env))
            await _ready(sip_adapter)
            port = sip_adapter.port
            sip = SipStack(
                translation=service,
                adapter=running,
                sip_adapter=sip_adapter,
                sip_port=port,
                egress=egress,
                proxy=proxy,
                redis=redis,
                redis_env=dict(redis_env),
                adapter_environ=adapter_env,
                tmp_path=tmp_path,
                sipp=Sipp(("127.0.0.1", port), tmp_path),
            )
            try:
                yield sip
            finally:
                for process in sip._processes:
                    process.stop()

    return start


@pytest.fixture
async def sip_stack(sip_stack_factory: SipStackFactory) -> AsyncIterator[SipStack]:
    """The stack with the default settings (translation deadline 2 s)."""
    async with sip_stack_factory() as stack:
        yield stack
