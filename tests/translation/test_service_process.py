"""The service as a real process (python -m numprotect.services.translation, grpcio's thread-pool server), over TLS
with API keys: the carrier CARRIER routes the seeded numbers' block and translates; tenant t1 keeps its blocklist.

Answers, errors, blocklist, stream, deadline, shared port, and open Health/Watch streams beyond the worker pool.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import redis
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.cluster import RedisCluster

from numprotect.core.identity.principal import Role
from numprotect.core.redis_client import create_redis
from numprotect.core.routes import MODE_AXN, Route, RouteTable
from numprotect.core.settings import Env, RedisSettings
from numprotect.translation.v1 import translation_pb2 as pb
from numprotect.translation.v1 import translation_pb2_grpc
from support.identity import mint, record_blocks
from support.processes import ServiceProcess
from support.tls import sync_secure_channel

X = "700100000000001"
X_AXN = "700100000000002"
A = "13800000001"
B = "13900000002"
SPAMMER = "13700000003"
SERVICE = "numprotect.translation.v1.TranslationService"
CARRIER = "cm"


def _seed(redis_env: dict[str, str], route_factory: Callable[..., Route]) -> None:
    """The routes of X and X_AXN, and CARRIER as the carrier of their block (before the process starts: it loads
    the carrier blocks and keys at start)."""

    async def seed() -> None:
        client = create_redis(RedisSettings.from_env(Env(redis_env)))
        table = RouteTable(client)
        await table.put(X, route_factory("b1"))
        await table.put(X_AXN, route_factory("n1", MODE_AXN))
        await client.aclose()

    asyncio.run(seed())
    with _redis(redis_env) as sync:
        record_blocks(sync, CARRIER, X, X_AXN)


def _redis(redis_env: dict[str, str]) -> Any:
    url = redis_env["NUMPROTECT_REDIS_URL"]
    return RedisCluster.from_url(url) if redis_env["NUMPROTECT_REDIS_MODE"] == "cluster" else redis.Redis.from_url(url)


def _token(redis_env: dict[str, str], role: Role, principal_id: str) -> str:
    """A key minted before the process starts (a later one is loaded within NUMPROTECT_AUTH_REFRESH_SECONDS)."""
    with _redis(redis_env) as sync:
        return mint(sync, role, principal_id)


def _settings(redis_env: dict[str, str]) -> dict[str, str]:
    return {
        **redis_env,
        "NUMPROTECT_TRANSLATION_BLOCKLIST_REFRESH": "100ms",
        "NUMPROTECT_TRANSLATION_RATE_PER_CALLER": "0",
        "NUMPROTECT_TRANSLATION_RATE_PER_BINDING": "0",
    }


@pytest.fixture
def carrier_token(redis_env: dict[str, str]) -> str:
    return _token(redis_env, Role.CARRIER, CARRIER)


@pytest.fixture
def tenant_token(redis_env: dict[str, str]) -> str:
    return _token(redis_env, Role.TENANT, "t1")


@pytest.fixture
def process(
    redis_env: dict[str, str], route_factory: Callable[..., Route], carrier_token: str, tenant_token: str
) -> Iterator[ServiceProcess]:
    _seed(redis_env, route_factory)
    service = ServiceProcess("translation", _settings(redis_env))
    try:
        service.wait_serving(service_name=SERVICE)
        yield service
    finally:
        assert service.stop() == 0, "\n".join(service.lines[-20:])


@pytest.fixture
def stub(process: ServiceProcess, carrier_token: str) -> Iterator[Any]:
    """The carrier's."""
    with process.channel(carrier_token) as channel:
        yield translation_pb2_grpc.TranslationServiceStub(channel)


@pytest.fixture
def tenant_stub(process: ServiceProcess, tenant_token: str) -> Iterator[Any]:
    with process.channel(tenant_token) as channel:
        yield translation_pb2_grpc.TranslationServiceStub(channel)


def _translate(stub: Any, caller: str, called: str = X, timeout: float = 5.0) -> pb.TranslateResponse:
    request = pb.TranslateRequest(calling_number=caller, called_number=called, call_id="c1")
    reply: pb.TranslateResponse = stub.Translate(request, timeout=timeout)
    return reply


def test_decisions_and_invalid_argument_details(stub: Any) -> None:
    to_b = _translate(stub, "+86" + A)
    assert (to_b.decision, to_b.target_number, to_b.display_number, to_b.call_id) == (pb.DECISION_CONNECT, B, X, "c1")
    assert _translate(stub, B).target_number == A
    assert _translate(stub, SPAMMER).reject_reason == pb.REJECT_REASON_NO_BINDING
    with pytest.raises(grpc.RpcError) as info:
        _translate(stub, A, called="123")
    error: Any = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    raw = dict(error.trailing_metadata())["grpc-status-details-bin"]
    bad = error_details_pb2.BadRequest()
    assert status_pb2.Status.FromString(raw).details[0].Unpack(bad)
    assert bad.field_violations[0].field == "called_number"


def test_blocklist_rpcs_apply_to_the_hot_path(stub: Any, tenant_stub: Any) -> None:
    assert _translate(stub, SPAMMER, X_AXN).decision == pb.DECISION_CONNECT
    tenant_stub.BlockCaller(pb.BlockCallerRequest(tenant_id="t1", calling_number=SPAMMER, reason="spam"), timeout=5)
    deadline = time.monotonic() + 2
    while _translate(stub, SPAMMER, X_AXN).reject_reason != pb.REJECT_REASON_CALLER_BLOCKED:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    listed = tenant_stub.ListBlockedCallers(pb.ListBlockedCallersRequest(tenant_id="t1"), timeout=5)
    assert [e.calling_number for e in listed.entries] == [SPAMMER]


def test_stream_matches_by_call_id(stub: Any) -> None:
    requests = [
        pb.TranslateStreamRequest(
            request=pb.TranslateRequest(call_id=f"s{i}", calling_number=A if i % 3 else B, called_number=X)
        )
        for i in range(300)
    ]
    requests.append(pb.TranslateStreamRequest(request=pb.TranslateRequest(call_id="bad", calling_number=A)))
    answers = {m.call_id: m for m in stub.TranslateStream(iter(requests), timeout=20)}
    assert len(answers) == 301
    assert answers["bad"].error.startswith("INVALID_ARGUMENT: called_number")
    for i in range(300):
        assert answers[f"s{i}"].response.target_number == (B if i % 3 else A)


def test_paused_redis_is_unavailable_within_the_deadline(stub: Any, redis_sync: Any) -> None:
    assert _translate(stub, A).decision == pb.DECISION_CONNECT
    if isinstance(redis_sync, RedisCluster):
        nodes = [redis.Redis(host=n.host, port=n.port) for n in redis_sync.get_primaries()]
    else:
        kwargs = redis_sync.connection_pool.connection_kwargs
        nodes = [redis.Redis(host=kwargs["host"], port=kwargs["port"])]
    for node in nodes:
        node.execute_command("CLIENT", "PAUSE", "1000", "ALL")
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            _translate(stub, A, timeout=0.2)
        error: Any = info.value
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        assert time.monotonic() - started < 0.2
    finally:
        for node in nodes:
            node.execute_command("CLIENT", "UNPAUSE")
            node.close()
    assert _translate(stub, A).decision == pb.DECISION_CONNECT  # recovered


def test_batched_stream_messages(stub: Any) -> None:
    batch = [pb.TranslateRequest(call_id=f"b{i}", calling_number=A, called_number=X) for i in range(50)]
    answers = list(stub.TranslateStream(iter([pb.TranslateStreamRequest(requests=batch)] * 3), timeout=20))
    assert len(answers) == 3
    for answer in answers:
        assert [r.call_id for r in answer.responses] == [f"b{i}" for i in range(50)]
        assert all(r.response.target_number == B for r in answer.responses)


@pytest.mark.chaos
def test_sixty_thousand_single_call_messages_on_one_stream_are_all_answered(stub: Any) -> None:
    """The aio TranslateStream once hung at 60,000 single-call messages (the aio model of translation is gone since
    the bootstrap issue): the thread-pool server answers every one, in order, on one stream."""
    total = 60_000
    requests = (
        pb.TranslateStreamRequest(requests=[pb.TranslateRequest(call_id=f"s{i}", calling_number=A, called_number=X)])
        for i in range(total)
    )
    answered = 0
    for answer in stub.TranslateStream(requests, timeout=300):
        assert [r.call_id for r in answer.responses] == [f"s{answered}"]
        assert answer.responses[0].response.target_number == B
        answered += 1
    assert answered == total


def test_processes_share_one_port_with_reuse_port(
    redis_env: dict[str, str], route_factory: Callable[..., Route], carrier_token: str
) -> None:
    """One process per core behind one port: NUMPROTECT_TRANSLATION_REUSE_PORT=1 on each."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with _redis(redis_env) as sync:
        record_blocks(sync, CARRIER, X)  # the carrier's number, with no binding
    settings = {**redis_env, "NUMPROTECT_TRANSLATION_REUSE_PORT": "1"}
    first = ServiceProcess("translation", settings, port=port)
    second = ServiceProcess("translation", settings, port=port)
    try:
        assert first.port == second.port == port
        for process in (first, second):
            process.wait_serving()
        with sync_secure_channel(f"127.0.0.1:{port}", carrier_token) as channel:
            stub: Any = translation_pb2_grpc.TranslationServiceStub(channel)
            assert _translate(stub, A).reject_reason == pb.REJECT_REASON_NO_BINDING
    finally:
        assert first.stop() == 0
        assert second.stop() == 0


def test_open_health_watches_beyond_the_worker_pool_leave_translate_answered(
    redis_env: dict[str, str], route_factory: Callable[..., Route], carrier_token: str
) -> None:
    """Envoy and client-side health checking keep a Health/Watch open per connection: an open watch must hold no
    worker thread, so more watches than workers still leave Translate answered; the drain tells every watch."""
    _seed(redis_env, route_factory)
    workers = 2
    service = ServiceProcess("translation", {**_settings(redis_env), "NUMPROTECT_TRANSLATION_WORKERS": str(workers)})
    try:
        service.wait_serving(service_name=SERVICE)
        with service.channel(carrier_token) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            names = ["", SERVICE] * 4
            watches = [health.Watch(health_pb2.HealthCheckRequest(service=name), timeout=20) for name in names]
            assert len(watches) > workers
            # Each watch's first answer: its handler ran on the server and the watch stays open there.
            assert [next(w).status for w in watches] == [health_pb2.HealthCheckResponse.SERVING] * len(names)

            stub: Any = translation_pb2_grpc.TranslationServiceStub(channel)
            started = time.monotonic()
            reply = _translate(stub, A, timeout=3.0)
            assert (reply.decision, reply.target_number) == (pb.DECISION_CONNECT, B)
            assert time.monotonic() - started < 3.0

            service.signal(signal.SIGTERM)  # the drain: NOT_SERVING to every watch before the server stops
            statuses = [next(w).status for w in watches]
            assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING] * len(names)
            for watch in watches:
                watch.cancel()
    finally:
        assert service.stop() == 0, "\n".join(service.lines[-20:])
