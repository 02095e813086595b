"""Translation is the read path: while Redis refuses or pauses writes it keeps connecting calls.

Each condition is made for real on a redis-server of the test's own: MISCONF (a background save that fails: its
folder is gone, with a save point, so stop-writes-on-bgsave-error applies), OOM (maxmemory 1, noeviction),
NOREPLICAS (min-replicas-to-write 1 without replicas) and CLIENT PAUSE WRITE (as a failover pauses a master).
Required: Translate and TranslateStream answer the same decisions as before (CONNECT to the right party, REJECT for
a stranger), the rate limit is not enforced meanwhile (fail open, logged) and is enforced again once Redis takes
writes. Also: UNAVAILABLE answers of the hot path carry google.rpc.RetryInfo and an ErrorInfo reason (unary), and
the stream's per-call error text names the same.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from numprotect.translation.v1 import translation_pb2 as pb
from support.redis_server import RedisServer, fail_a_save, saving_redis, take_writes_again
from support.rpc import rpc_error

A = "13800000001"
B = "13900000002"
STRANGER = "13700000003"
X = "700100000000001"
LIMITED = {"NUMPROTECT_TRANSLATION_RATE_PER_CALLER": "2", "NUMPROTECT_TRANSLATION_RATE_PER_BINDING": "3"}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "redis-data"
    path.mkdir()
    return path


@pytest.fixture
def own_redis(data_dir: Path) -> Iterator[RedisServer]:
    """A Redis of the test's own, with a save point (a failed background save then stops writes: MISCONF)."""
    server = saving_redis(data_dir)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_env(own_redis: RedisServer) -> dict[str, str]:
    """The translation fixtures (conftest) run on this module's own Redis."""
    return {"NUMPROTECT_REDIS_URL": own_redis.url, "NUMPROTECT_REDIS_MODE": "standalone"}


def _misconf(admin: redis.Redis, data_dir: Path) -> Callable[[], object]:
    fail_a_save(admin, data_dir)
    return lambda: take_writes_again(admin)


def _config(setting: str) -> Callable[[redis.Redis, Path], Callable[[], object]]:
    def apply(admin: redis.Redis, data_dir: Path) -> Callable[[], object]:
        admin.config_set(setting, "1")
        return lambda: admin.config_set(setting, "0")

    return apply


def _pause_writes(admin: redis.Redis, data_dir: Path) -> Callable[[], object]:
    # Scripts flushed too (a restarted or newly promoted node): while writes are paused an EVALSHA of a script Redis
    # does not know waits like a write, so the client loads the read-only copy before sending it.
    admin.script_flush()
    admin.execute_command("CLIENT", "PAUSE", "20000", "WRITE")
    return lambda: admin.execute_command("CLIENT", "UNPAUSE")


# condition -> (make it, what a write's refusal says then: None when writes wait instead, the cause the service logs)
CONDITIONS: dict[str, tuple[Callable[[redis.Redis, Path], Callable[[], object]], str | None, str]] = {
    "MISCONF": (_misconf, "MISCONF", "MISCONF"),
    "OOM": (_config("maxmemory"), "maxmemory", "OOM"),  # redis-py cuts the OOM code off the message
    "NOREPLICAS": (_config("min-replicas-to-write"), "NOREPLICAS", "NOREPLICAS"),
    "CLIENT PAUSE WRITE": (_pause_writes, None, "NO_WRITES"),
}


async def _stream(tr: Any, *callers: str) -> list[pb.TranslateStreamResponse]:
    """One TranslateStream message with a call from each caller; the answers of that message."""

    async def send() -> AsyncIterator[pb.TranslateStreamRequest]:
        yield pb.TranslateStreamRequest(
            requests=[
                pb.TranslateRequest(calling_number=c, called_number=X, call_id=f"s{i}") for i, c in enumerate(callers)
            ]
        )

    call = tr.stub.TranslateStream(send(), timeout=10)
    answers = [message async for message in call]
    assert len(answers) == 1
    return list(answers[0].responses)


@pytest.mark.parametrize("condition", list(CONDITIONS))
async def test_while_writes_are_refused_or_paused_calls_are_still_decided(
    translation_factory: Any,
    own_redis: RedisServer,
    data_dir: Path,
    condition: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    make, refusal, cause = CONDITIONS[condition]
    tr = await translation_factory(LIMITED)
    await tr.put(tr.route("b1"))  # AXB: A <-> B
    assert (await tr.translate(A)).target_number == B  # A's counter: 1 of 2
    admin = own_redis.client()
    undo = make(admin, data_dir)
    try:
        if refusal is not None:  # the condition is real: a plain write is refused
            with pytest.raises(redis.ResponseError, match=refusal):
                admin.set("probe", "1")
        caplog.set_level(logging.WARNING)
        # A's limit (2 per window) would refuse from the second call on: not enforced, every call connects.
        for _ in range(4):
            answer = await tr.translate(A, deadline=2.0)
            assert (answer.decision, answer.target_number, answer.binding_id) == (pb.DECISION_CONNECT, B, "b1")
        assert (await tr.translate(B, deadline=2.0)).target_number == A
        stranger = await tr.translate(STRANGER, deadline=2.0)
        assert (stranger.decision, stranger.reject_reason) == (pb.DECISION_REJECT, pb.REJECT_REASON_NO_BINDING)
        streamed = await _stream(tr, A, STRANGER, B)
        assert [m.error for m in streamed] == ["", "", ""]
        assert [(m.response.decision, m.response.target_number) for m in streamed] == [
            (pb.DECISION_CONNECT, B),
            (pb.DECISION_REJECT, ""),
            (pb.DECISION_CONNECT, A),
        ]
        # One line per interval, not one per call; under a pause also the client's, naming the node it took for paused.
        logged = [r.getMessage() for r in caplog.records if r.name.endswith("translation.core")]
        assert len(logged) == 1, logged
        assert "rate limits not enforced" in logged[0] and cause in logged[0], logged
        paused = [r.getMessage() for r in caplog.records if r.name.endswith("translation.fastredis")]
        assert len(paused) == (1 if refusal is None else 0), paused
    finally:
        undo()
        admin.close()
    # Writes taken again: A's limit bites again (after the read-only interval of a pause, 1 s).
    decisions: list[int] = []
    deadline = time.monotonic() + 5
    while pb.REJECT_REASON_RATE_LIMITED not in decisions and time.monotonic() < deadline:
        answer = await tr.translate(A)
        decisions.append(answer.reject_reason)
        await asyncio.sleep(0.05)
    assert decisions[-1] == pb.REJECT_REASON_RATE_LIMITED, decisions


def _details(error: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status details"
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    unpacked = {type(m).__name__ for d in status.details for m in (info, retry) if d.Unpack(m)}
    assert unpacked == {"ErrorInfo", "RetryInfo"}, unpacked
    return info, retry


async def test_unavailable_carries_its_reason_and_retry_hint(tr: Any, own_redis: RedisServer) -> None:
    """Redis paused for every command: the unary call is UNAVAILABLE with ErrorInfo REDIS_UNREACHABLE and a
    RetryInfo; a stream's call answers "UNAVAILABLE: <message> [REDIS_UNREACHABLE; retry after 1 s]"."""
    await tr.put(tr.route("b1"))
    assert (await tr.translate(A)).decision == pb.DECISION_CONNECT
    admin = own_redis.client()
    # Long enough for both calls (about 0.5 s each); it lapses by itself (CLIENT UNPAUSE would wait for it).
    admin.execute_command("CLIENT", "PAUSE", "2000", "ALL")
    admin.close()
    error = await rpc_error(tr.translate(A, deadline=0.5))
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    info, retry = _details(error)
    assert (info.reason, info.domain) == ("REDIS_UNREACHABLE", "numprotect")
    assert retry.retry_delay.ToNanoseconds() == 1_000_000_000
    (streamed,) = await _stream(tr, A)
    assert streamed.error.startswith("UNAVAILABLE: translation storage"), streamed.error
    assert streamed.error.endswith(" [REDIS_UNREACHABLE; retry after 1 s]"), streamed.error
