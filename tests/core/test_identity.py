"""The identity library against a real Redis: tokens, the per-process directory, the audit chain, and the
identity concern in the real call layer of a real (TLS) server."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from numprotect.core.identity import api_keys, audit
from numprotect.core.identity.api_keys import AuthSettings, HashKey
from numprotect.core.identity.audit import AuditEvent, AuditLog
from numprotect.core.identity.directory import (
    CARRIER_BLOCKS_KEY,
    CARRIER_VERSION_KEY,
    RECORD_BLOCK_CARRIER,
    Directory,
)
from numprotect.core.identity.layer import UNAUTHENTICATED_MESSAGE
from numprotect.core.identity.principal import Principal, Role, principal_from_spiffe_id
from numprotect.core.settings import Env, SettingsError
from numprotect.translation.v1 import translation_pb2, translation_pb2_grpc

KEY = HashKey(b"k" * 32)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture
def directory(redis_sync: Any) -> Iterator[Directory]:
    found = Directory(KEY, redis_sync, refresh_seconds=0.05, now_ms=now_ms)
    yield found
    found.stop()


# -- tokens ----------------------------------------------------------------------------------------------------
def test_a_token_is_high_entropy_and_only_its_keyed_hash_is_stored(redis_sync: Any) -> None:
    record, token = api_keys.mint_sync(redis_sync, KEY, Role.TENANT, "acme", description="d", now_ms=now_ms())
    key_id, secret = api_keys.split_token(token) or ("", "")
    assert key_id == record.key_id and len(secret) == 43
    stored = redis_sync.hget(api_keys.KEYS_KEY, record.key_id).decode()
    assert secret not in stored and token not in stored
    # The same secret hashed with another key does not match: Redis write access cannot mint a token.
    assert api_keys.token_hash(HashKey(b"x" * 32), key_id, secret) != record.token_hash
    assert "k" * 32 not in repr(KEY)


@pytest.mark.parametrize(
    "environ, message",
    [
        ({}, "NUMPROTECT_AUTH_KEY_FILE: required"),
        ({"NUMPROTECT_AUTH_KEY_FILE": "/nonexistent/key"}, "NUMPROTECT_AUTH_KEY_FILE: cannot read"),
        ({"NUMPROTECT_AUTH": "maybe"}, "NUMPROTECT_AUTH"),
    ],
)
def test_auth_settings_refuse_to_start_without_a_usable_key(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        AuthSettings.from_env(Env(environ))


def test_a_short_key_file_is_refused_without_echoing_it(tmp_path: Any) -> None:
    path = tmp_path / "auth.key"
    path.write_text("c2hvcnQ=")  # base64 of "short"
    with pytest.raises(SettingsError) as raised:
        AuthSettings.from_env(Env({"NUMPROTECT_AUTH_KEY_FILE": str(path)}))
    assert "c2hvcnQ" not in str(raised.value) and "32 bytes" in str(raised.value)


# -- the directory ---------------------------------------------------------------------------------------------
def test_directory_authenticates_valid_tokens_only(redis_sync: Any, directory: Directory) -> None:
    record, token = api_keys.mint_sync(redis_sync, KEY, Role.CARRIER, "cm", description="d", now_ms=now_ms())
    directory.reload()
    assert directory.authenticate(token) == Principal(Role.CARRIER, "cm", record.key_id)
    key_id, secret = api_keys.split_token(token) or ("", "")
    wrong_secret = f"npk_{key_id}_{'A' * 43}"
    unknown_id = f"npk_{'0' * 16}_{secret}"
    for bad in (wrong_secret, unknown_id, "npk_short", "", token + "x", token.upper()):
        assert directory.authenticate(bad) is None


def test_revoked_and_expired_keys_stop_after_a_reload(redis_sync: Any, directory: Directory) -> None:
    record, token = api_keys.mint_sync(redis_sync, KEY, Role.TENANT, "t1", description="d", now_ms=now_ms())
    # Valid long enough for the checks before its expiry on a loaded host (300 ms once ran out before the first).
    expires_at = now_ms() + 2000
    expiring, expiring_token = api_keys.new_key(
        KEY, Role.TENANT, "t1", description="d", created_by="test", now_ms=now_ms(), expire_ms=expires_at
    )
    api_keys.store_sync(redis_sync, expiring)
    directory.reload()
    principal = directory.authenticate(token)
    assert principal is not None and directory.authenticate(expiring_token) is not None
    api_keys.store_sync(redis_sync, record.revoked(now_ms()))
    assert directory.authenticate(token) is not None  # not yet reloaded
    assert directory.reload() is True
    assert directory.authenticate(token) is None
    assert not directory.still_valid(principal)
    time.sleep(max(0, expires_at - now_ms()) / 1000 + 0.05)
    assert directory.authenticate(expiring_token) is None  # expiry needs no reload


def test_reload_reads_the_keys_only_after_a_change(redis_sync: Any, directory: Directory) -> None:
    api_keys.mint_sync(redis_sync, KEY, Role.TENANT, "t1", description="d", now_ms=now_ms())
    assert directory.reload() is True
    assert directory.reload() is False


def test_the_refresher_thread_picks_up_a_revocation_on_its_own(redis_sync: Any, directory: Directory) -> None:
    record, token = api_keys.mint_sync(redis_sync, KEY, Role.TENANT, "t1", description="d", now_ms=now_ms())
    directory.start()
    assert directory.authenticate(token) is not None
    api_keys.store_sync(redis_sync, record.revoked(now_ms()))
    revoked_at = time.monotonic()
    while directory.authenticate(token) is not None:
        assert time.monotonic() - revoked_at < 3.0
        time.sleep(0.01)


def test_carrier_blocks_are_recorded_once_and_looked_up_in_memory(redis_sync: Any, directory: Directory) -> None:
    script = redis_sync.register_script(RECORD_BLOCK_CARRIER)
    keys = [CARRIER_BLOCKS_KEY, CARRIER_VERSION_KEY]
    assert script(keys=keys, args=["70010000001", "cm"]) == b"cm"
    version = redis_sync.get(CARRIER_VERSION_KEY)
    assert script(keys=keys, args=["70010000001", "cm"]) == b"cm"  # idempotent: no version bump
    assert script(keys=keys, args=["70010000001", "cu"]) == b"cm"  # another carrier is refused: the holder
    assert redis_sync.get(CARRIER_VERSION_KEY) == version
    directory.reload()
    assert directory.carrier_of("700100000011234") == "cm"
    assert directory.carrier_of("700100000021234") is None


def test_spiffe_ids_name_principals() -> None:
    assert principal_from_spiffe_id("spiffe://numprotect/carrier/cm") == Principal(Role.CARRIER, "cm")
    assert principal_from_spiffe_id("spiffe://numprotect/service/binding") == Principal(Role.SERVICE, "binding")
    assert principal_from_spiffe_id("spiffe://numprotect/operator/alice") == Principal(Role.OPERATOR, "alice")
    for bad in ("spiffe://other/carrier/cm", "spiffe://numprotect/king/x", "spiffe://numprotect/tenant/", "x"):
        assert principal_from_spiffe_id(bad) is None


# -- the audit chain -------------------------------------------------------------------------------------------
def event(n: int) -> AuditEvent:
    return AuditEvent(now_ms(), f"tenant:t{n}", "tenant", "/m", "", "", "OK", "", "ipv4:127.0.0.1:1")


def test_writers_in_several_processes_build_one_chain_that_verifies(redis_sync: Any) -> None:
    audit_key = KEY.derive("audit")
    logs = [AuditLog(audit_key, redis_sync) for _ in range(3)]
    for log in logs:
        log.start()
    threads = [threading.Thread(target=lambda log=log: [log.record(event(i)) for i in range(40)]) for log in logs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for log in logs:
        assert log.flush(10)
        log.stop()
    report = audit.verify_redis(audit_key, redis_sync)
    assert report.ok and report.events == 120, report


def test_an_edited_removed_or_forged_event_is_found(redis_sync: Any) -> None:
    audit_key = KEY.derive("audit")
    log = AuditLog(audit_key, redis_sync)
    log.start()
    for i in range(5):
        log.record(event(i))
    assert log.flush(10)
    log.stop()
    entries = redis_sync.xrange(audit.LOG_KEY)
    third_id = entries[2][0]
    # Someone with write access to Redis rewrites the stream with one event edited (no in-place edits in streams).
    redis_sync.delete(audit.LOG_KEY)
    for entry_id, fields in entries:
        body = fields[b"e"].replace(b"tenant:t2", b"tenant:t9") if entry_id == third_id else fields[b"e"]
        redis_sync.xadd(audit.LOG_KEY, {b"e": body, b"m": fields[b"m"]}, id=entry_id)
    report = audit.verify_redis(audit_key, redis_sync)
    assert not report.ok and report.first_bad_id == third_id.decode() and report.events == 3
    # Removed instead: the event after the gap does not verify.
    redis_sync.xdel(audit.LOG_KEY, third_id)
    report = audit.verify_redis(audit_key, redis_sync)
    assert not report.ok and report.first_bad_id == entries[3][0].decode()
    # A whole chain recomputed without the audit key (e.g. a plain hash) does not verify either.
    assert not audit.verify_redis(HashKey(b"z" * 32).derive("audit"), redis_sync).ok


# -- the concern in the real call layer ------------------------------------------------------------------------
@pytest.fixture
async def translation(redis_env: dict[str, str]) -> AsyncIterator[Any]:
    from numprotect.services.translation.app import build_sync
    from support.inprocess import running_sync_service

    async with running_sync_service("translation", build_sync, redis_env) as svc:
        yield svc


async def test_no_wrong_or_revoked_credentials_are_unauthenticated_with_one_message(translation: Any) -> None:
    request = translation_pb2.ListBlockedCallersRequest(tenant_id="t1")
    token = translation.token(Role.TENANT, "t1")
    key_id = (api_keys.split_token(token) or ("", ""))[0]
    messages = set()
    wrong_secret = token[:-1] + ("B" if token.endswith("A") else "A")  # never the token itself
    for channel in (translation.channel, translation.channel_with(wrong_secret), translation.channel_with("xyz")):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await translation_pb2_grpc.TranslationServiceStub(channel).ListBlockedCallers(request, timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        messages.add(raised.value.details())
    assert messages == {UNAUTHENTICATED_MESSAGE}
    assert key_id not in UNAUTHENTICATED_MESSAGE
    # Health stays open without credentials (Kubernetes probes).
    health = await health_pb2_grpc.HealthStub(translation.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_role_outside_the_policy_is_denied_and_audited(translation: Any) -> None:
    stub = translation_pb2_grpc.TranslationServiceStub(translation.channel_as(Role.TENANT, "t1"))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Translate(
            translation_pb2.TranslateRequest(called_number="700100000011234", calling_number="13800000001")
        )
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    identity = translation.runtime.identity
    assert identity.audit.flush(5)
    rows = translation.redis.xrange(audit.LOG_KEY)
    denied = [AuditEvent.from_canonical(fields[b"e"]) for _, fields in rows]
    assert [(e.principal.split("/")[0], e.method.rsplit("/", 1)[1], e.outcome) for e in denied] == [
        ("tenant:t1", "Translate", "PERMISSION_DENIED")
    ]


def test_a_key_or_block_made_a_moment_ago_is_found_by_one_reload_on_the_miss(
    redis_sync: Any, directory: Directory
) -> None:
    directory.reload()
    time.sleep(0.15)  # past the miss-reload interval of the first reload's caller
    _, token = api_keys.mint_sync(redis_sync, KEY, Role.TENANT, "t1", description="d", now_ms=now_ms())
    assert directory.authenticate(token) is not None  # no interval waited, no manual reload
    redis_sync.register_script(RECORD_BLOCK_CARRIER)(
        keys=[CARRIER_BLOCKS_KEY, CARRIER_VERSION_KEY], args=["70010000009", "cm"]
    )
    assert directory.carrier_of("700100000091234") is None  # within the interval: no second reload
    time.sleep(0.15)
    assert directory.carrier_of("700100000091234") == "cm"
    # Unknown ids at a high rate reload at most once per interval: the versions are read a bounded number of times.
    reads: list[str] = []
    original_get = redis_sync.get

    def counted_get(key: str) -> Any:
        reads.append(key)
        return original_get(key)

    redis_sync.get = counted_get
    try:
        started = time.monotonic()
        while time.monotonic() - started < 0.25:
            assert directory.authenticate(f"npk_{'1' * 16}_{'A' * 43}") is None
    finally:
        redis_sync.get = original_get
    assert 2 <= len(reads) <= 8, len(reads)  # two version keys per reload, at most 3 reloads in 0.25 s
