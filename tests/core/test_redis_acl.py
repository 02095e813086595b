"""The Redis ACL users (numprotect.core.redis_acl) on a real redis-server started with the rendered ACL file.

Each service's user runs that service's real operations (its scripts, its key layouts, its domain code); the
translation user gets NOPERM writing another service's key, writing a route and on every dangerous command.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from numprotect.cdr.v1 import cdr_pb2
from numprotect.core import event_keys, pool_keys
from numprotect.core.binding_records import (
    BindingRecord,
    BindingRecordStore,
    binding_key,
    get_binding_records,
    trace_number,
)
from numprotect.core.cdr_keys import Bucket
from numprotect.core.clock import SystemClock
from numprotect.core.identity.audit import APPEND_SCRIPT, HEAD_KEY, LOG_KEY
from numprotect.core.limits import ConcurrencyLimit
from numprotect.core.redis_acl import (
    ACL_USERS,
    ADMIN_USER,
    SERVICE_USERS,
    acl_user,
    parse_redis_version,
    render_acl_file,
    setuser_commands,
)
from numprotect.core.redis_client import RedisClient, create_redis, create_sync_redis, sync_redis_is_up
from numprotect.core.routes import MODE_AXB, Route, RouteTable, lock_key
from numprotect.core.settings import Env, RedisSettings
from numprotect.services.allocation.pools import NumberPools
from numprotect.services.allocation.scripts import Scripts
from numprotect.services.allocation.settings import AllocationSettings
from numprotect.services.cdr.settings import CdrSettings
from numprotect.services.cdr.store import CdrStore
from numprotect.services.cdr.validation import ValidCdr
from numprotect.services.translation.blocklist import BlocklistStore, StoredEntry
from numprotect.services.translation.core import SCRIPT
from numprotect.services.translation.fastredis import ScriptClient
from support.event_outbox import expiries, expiry_hint, hinted, outbox
from support.redis_server import RedisServer

DANGEROUS = [
    ("FLUSHALL",),
    ("FLUSHDB",),
    ("CONFIG", "GET", "*"),
    ("CONFIG", "SET", "appendonly", "no"),
    ("KEYS", "*"),
    ("DEBUG", "SLEEP", "0"),
    ("SHUTDOWN", "NOSAVE"),
    ("MONITOR",),
    ("SCAN", "0"),
    ("ACL", "LIST"),
    ("SCRIPT", "FLUSH"),
    ("SWAPDB", "0", "1"),
]


def redis_version() -> tuple[int, int]:
    binary = shutil.which("redis-server")
    assert binary is not None
    return parse_redis_version(subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout)


class AclRedis:
    """A redis-server whose users are the table's, each with a fresh password in a file of its own."""

    def __init__(self, folder: Path) -> None:
        self.passwords = {user.name: secrets.token_urlsafe(24) for user in ACL_USERS}
        self.folder = folder
        acl = folder / "users.acl"
        acl.write_text(render_acl_file(self.passwords, redis_version=redis_version()))
        for name, password in self.passwords.items():
            (folder / f"{name}.password").write_text(password + "\n")
        # DEBUG enabled, so that the ACL is what refuses it
        self.server = RedisServer(
            "--aclfile", str(acl), "--enable-debug-command", "yes", auth=(ADMIN_USER, self.passwords[ADMIN_USER])
        )

    def env(self, user: str, **extra: str) -> dict[str, str]:
        return {
            "NUMPROTECT_REDIS_URL": self.server.url,
            "NUMPROTECT_REDIS_USERNAME": user,
            "NUMPROTECT_REDIS_PASSWORD_FILE": str(self.folder / f"{user}.password"),
            **extra,
        }

    def settings(self, user: str) -> RedisSettings:
        return RedisSettings.from_env(Env(self.env(user)))

    def sync(self, user: str) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.server.port, username=user, password=self.passwords[user])


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclRedis]:
    server = AclRedis(tmp_path_factory.mktemp("acl"))
    yield server
    server.server.stop()


@pytest.fixture
def admin(acl_redis: AclRedis) -> Iterator[redis.Redis]:
    client = acl_redis.sync(ADMIN_USER)
    yield client
    client.close()


def _unique() -> str:
    return str(time.time_ns() % 10**8).zfill(8)


def test_the_acl_file_defines_every_user_and_switches_the_default_user_off(
    acl_redis: AclRedis, admin: redis.Redis
) -> None:
    assert set(admin.acl_users()) == {"default", *(u.name for u in ACL_USERS)}
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=acl_redis.server.port).ping()
    line = render_acl_file(acl_redis.passwords)
    for password in acl_redis.passwords.values():
        assert password not in line  # only SHA-256 digests
    for command in setuser_commands(acl_redis.passwords):
        assert not set(acl_redis.passwords.values()) & set(command)


def test_script_writes_survive_a_restart_from_the_aof(tmp_path: Path) -> None:
    """redis-server replays its AOF as the `default` user: switched off, but with the permissions the replay needs
    (see render_acl_file). With `-@all` a script's writes (replayed as MULTI/EXEC) were lost on every restart."""
    passwords = {user.name: secrets.token_urlsafe(24) for user in ACL_USERS}
    acl = tmp_path / "users.acl"
    acl.write_text(render_acl_file(passwords, redis_version=redis_version()))
    server = RedisServer("--aclfile", str(acl), appendonly=True, auth=(ADMIN_USER, passwords[ADMIN_USER]))
    try:
        admin = redis.Redis(host="127.0.0.1", port=server.port, username=ADMIN_USER, password=passwords[ADMIN_USER])
        key = f"np:test:aof:{_unique()}"
        admin.eval("redis.call('SET', KEYS[1], 'a'); redis.call('SET', KEYS[1] .. ':2', 'b'); return 1", 1, key)
        admin.close()
        server.process.terminate()  # SIGTERM: the AOF is written out, then replayed on the start below
        server.process.wait(10)
        server.restart()
        admin = redis.Redis(host="127.0.0.1", port=server.port, username=ADMIN_USER, password=passwords[ADMIN_USER])
        assert admin.mget([key, f"{key}:2"]) == [b"a", b"b"]
        admin.close()
        with pytest.raises(redis.AuthenticationError):  # and still nobody logs in as `default`
            redis.Redis(host="127.0.0.1", port=server.port).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port, username="default", password="").ping()
    finally:
        server.stop()


def test_setuser_commands_give_the_same_users_as_the_file(acl_redis: AclRedis, admin: redis.Redis) -> None:
    other = RedisServer()
    try:
        client = other.client()
        for command in setuser_commands(acl_redis.passwords, redis_version=redis_version()):
            assert client.execute_command(*command) == b"OK"
        probes = [*DANGEROUS, ("GET", "np:rt:{1}:n"), ("SET", "np:rt:{1}:n", "x"), ("SET", "np:alloc:x", "x")]
        probes += [("EVALSHA", "0" * 40, "1", "np:rt:{1}:n"), ("SCRIPT", "LOAD", "return 1"), ("CLUSTER", "SLOTS")]
        for user in ACL_USERS:
            mine, loaded = client.acl_getuser(user.name), admin.acl_getuser(user.name)
            assert mine is not None and loaded is not None and mine["keys"] == loaded["keys"]
            for probe in probes:
                assert client.acl_dryrun(user.name, *probe) == admin.acl_dryrun(user.name, *probe), probe
    finally:
        other.stop()


@pytest.mark.parametrize("user", sorted(SERVICE_USERS.values()))
@pytest.mark.parametrize("command", DANGEROUS, ids=" ".join)
def test_no_service_user_runs_a_dangerous_command(
    acl_redis: AclRedis, admin: redis.Redis, user: str, command: tuple[str, ...]
) -> None:
    admin.set("np:rt:{700100000000009}:n", "kept")
    client = acl_redis.sync(user)
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)
    finally:
        client.close()
    assert admin.get("np:rt:{700100000000009}:n") == b"kept"
    assert admin.ping()


def test_the_translation_user_reads_routes_and_writes_nothing_of_the_others(
    acl_redis: AclRedis, admin: redis.Redis
) -> None:
    number = "7001" + _unique() + "001"
    route = f"np:rt:{{{number}}}:n"
    admin.set(route, "b1|r1|t1|2|13800000001||0|0|0|0")
    translation = acl_redis.sync("numprotect-translation")
    try:
        assert translation.get(route) is not None
        for key in (f"np:alloc:{{pool:t1:010}}:h:{number}", route, lock_key(number), "np:b:{b1}", "np:cdr:{t:t1}:s"):
            with pytest.raises(redis.exceptions.NoPermissionError):
                translation.set(key, "x")
        # Nor through a script: EVAL may name the route (its selector), the SET inside is checked and refused.
        with pytest.raises(redis.ResponseError, match=r"can't access|NOPERM|no permissions"):
            translation.eval("return redis.call('SET', KEYS[1], 'x')", 1, route)
        with pytest.raises(redis.ResponseError, match=r"can't access|NOPERM|no permissions"):
            translation.eval("return redis.call('SET', 'np:alloc:{pool:t1:010}', 'x')", 0)
        with pytest.raises(redis.exceptions.NoPermissionError):
            translation.eval("return 1", 1, "np:alloc:{pool:t1:010}")
    finally:
        translation.close()
    assert admin.get(route) == b"b1|r1|t1|2|13800000001||0|0|0|0"
    assert admin.exists("np:alloc:{pool:t1:010}") == 0


def test_the_sip_user_reads_the_identity_keys_and_nothing_else(acl_redis: AclRedis, admin: redis.Redis) -> None:
    """The SIP adapter asks translation for every answer: Redis gives it only what its identity directory loads."""
    number = "7001" + _unique() + "002"
    admin.hset("np:auth:{auth}:keys", "k-sip", "record")
    sip = acl_redis.sync("numprotect-sip")
    try:
        assert sip.hget("np:auth:{auth}:keys", "k-sip") == b"record"
        assert sip.hgetall("np:carriers:{carriers}:blocks") == {}
        for key in (f"np:rt:{{{number}}}:n", lock_key(number), "np:b:{b1}", "np:bl:{g}", "np:cdr:{t:t1}:s"):
            with pytest.raises(redis.exceptions.NoPermissionError):
                sip.exists(key)
    finally:
        sip.close()


@pytest.mark.parametrize(
    ("user", "foreign_key"),
    [
        ("numprotect-allocation", "np:rt:{700100000000001}:n"),
        ("numprotect-binding", "np:alloc:{pool:t1:010}"),
        ("numprotect-binding", "np:auth:{auth}:keys"),
        ("numprotect-binding", "np:carriers:{carriers}:blocks"),
        ("numprotect-cdr", "np:b:{b1}"),
        ("numprotect-cdr", "np:carriers:{carriers}:blocks"),
        ("numprotect-translation", "np:carriers:{carriers}:blocks"),
        ("numprotect-translation", "np:auth:{auth}:keys"),
        # Events: the producers write only the outboxes, rings (and binding the expiries); the events service reads
        # what it renders and writes none of it.
        ("numprotect-translation", "np:ev:o:{e0}"),
        ("numprotect-allocation", "np:ev:x:{e0}"),
        ("numprotect-cdr", "np:ev:xring:{xring0}"),
        ("numprotect-binding", "np:ev:{ev:t:t1}:eps"),
        ("numprotect-cdr", "np:ev:{tenants}"),
        ("numprotect-events", "np:b:{b1}"),
        ("numprotect-events", "np:nh:{700100000000001}"),
        ("numprotect-events", "np:cdr:{t:t1}:s"),
        ("numprotect-events", "np:alloc:{pool:t1:010}"),
        ("numprotect-events", "np:auth:{auth}:keys"),
        # sip asks translation for everything: the identity keys it reads are all it may touch.
        ("numprotect-sip", "np:auth:{auth}:keys"),
        ("numprotect-sip", "np:carriers:{carriers}:blocks"),
        ("numprotect-sip", "np:rt:{700100000000001}:n"),
        ("numprotect-sip", "np:bl:{g}"),
    ],
)
def test_a_service_user_cannot_write_keys_it_only_reads_or_does_not_own(
    acl_redis: AclRedis, user: str, foreign_key: str
) -> None:
    client = acl_redis.sync(user)
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.hset(foreign_key, "f", "v")
    finally:
        client.close()


def test_every_user_appends_to_the_audit_log_and_reads_api_keys(acl_redis: AclRedis, admin: redis.Redis) -> None:
    """The identity keys every service shares: the audit script (head + stream) and the API key records."""
    admin.hset("np:auth:{auth}:keys", "k1", "record")
    for name in SERVICE_USERS.values():
        client = acl_redis.sync(name)
        try:
            append = client.register_script(APPEND_SCRIPT)
            head = client.get(HEAD_KEY) or b""
            assert append(keys=[HEAD_KEY, LOG_KEY], args=[head, f'{{"by":"{name}"}}', f"mac-{name}"])[0] == 1
            assert client.hget("np:auth:{auth}:keys", "k1") == b"record"
            assert client.hgetall("np:carriers:{carriers}:blocks") == {}  # every identity directory loads it
        finally:
            client.close()
    assert admin.xlen(LOG_KEY) == len(SERVICE_USERS)


@pytest.fixture
async def as_user(acl_redis: AclRedis) -> AsyncIterator[Any]:
    clients: list[RedisClient] = []

    def connect(user: str) -> RedisClient:
        client = create_redis(acl_redis.settings(user))
        clients.append(client)
        return client

    yield connect
    for client in clients:
        await client.aclose()


async def test_allocation_runs_its_pool_operations_as_its_user(as_user: Any, admin: redis.Redis) -> None:
    client = as_user("numprotect-allocation")
    settings = AllocationSettings.from_env(Env({}))
    pools = NumberPools(client, settings, Scripts.load(), redis_limit=ConcurrencyLimit(4, wait_seconds=1, name="r"))
    block = "7001" + _unique()[:7]
    tenant = "acl" + _unique()
    assert await pools.import_block(block, tenant, "010", "carrier-acl", "op") == 10_000
    allocation = await pools.allocate(tenant, "AXB", ["13800000001", "13800000002"], "010", True, 30)
    assert allocation.number.startswith(block)
    await pools.lock(allocation.number, "abuse", "op")
    assert admin.exists(lock_key(allocation.number)) == 1
    await pools.unlock(allocation.number, "op")
    # Their events, in the outbox of the number's sub-pool slot, and the slot's hint.
    subpool = pool_keys.number_subpool_key(tenant, "010", allocation.number, settings.subpools)
    assert [e["ty"] for e in outbox(admin, subpool)] == ["number.locked", "number.unlocked"]
    assert hinted(admin, subpool)
    assert (await pools.stats(tenant, "010")).total == 10_000
    history = await pools.history(allocation.number, 10, None)
    assert history


async def test_binding_writes_routes_records_and_history_as_its_user(as_user: Any, admin: redis.Redis) -> None:
    client = as_user("numprotect-binding")
    now = int(time.time() * 1000)
    number = "7001" + _unique() + "002"
    binding_id = "acl-" + _unique()
    route = Route(binding_id, "t1", MODE_AXB, "13800000001", "13900000002", 0, False, False, now + 600_000)
    await RouteTable(client).put(number, route)
    record = BindingRecord(
        binding_id, "t1", "o1", MODE_AXB, "13800000001", "13900000002", number, "", "010", 0, False, False, True,
        now, now + 600_000, now, 0,
    )  # fmt: skip
    store = BindingRecordStore(client)
    assert await store.create(record, reservation_id="rv1.x", city_fallback=False)
    assert await store.activate(binding_id, expire_ms=record.expire_ms)
    await store.add_to_history(number, binding_id, now + 600_000)
    await client.set(f"np:ord:{{t1:o1-{binding_id}}}", "p|x")
    assert admin.get(route.keys(number)[0]) is not None
    # binding.created in the record's slot, the slot's expiries and both hints.
    key = binding_key(binding_id)
    assert [e["ty"] for e in outbox(admin, key)] == ["binding.created"]
    assert expiries(admin, key) == {binding_id: record.expire_ms}
    assert hinted(admin, key) and expiry_hint(admin, key) == record.expire_ms


async def test_cdr_ingests_and_enriches_as_its_user(as_user: Any, admin: redis.Redis) -> None:
    binding = as_user("numprotect-binding")
    cdr = as_user("numprotect-cdr")
    now = int(time.time() * 1000)
    number = "7001" + _unique() + "003"
    binding_id = "acl-cdr-" + _unique()
    record = BindingRecord(
        binding_id, "t1", "o1", MODE_AXB, "13800000001", "13900000002", number, "", "010", 0, False, False, True,
        now - 1000, now + 600_000, now - 1000, 0,
    )  # fmt: skip
    store = BindingRecordStore(binding)
    await store.create(record, reservation_id="rv1.x", city_fallback=False)
    await store.activate(binding_id)
    await store.add_to_history(number, binding_id, now + 600_000)
    assert binding_id in await get_binding_records(cdr, [binding_id])
    assert [r.binding_id for r in await trace_number(cdr, number, now)] == [binding_id]
    bucket = Bucket("t-acl-" + _unique())
    window = now - now % 3_600_000
    keys = [bucket.stream, bucket.time_index, bucket.prefix + "id:c1", bucket.daily("20260301")]
    keys += [bucket.binding_index(binding_id), bucket.order_index("o1"), bucket.abuse(window, number)]
    keys += [bucket.abuse_flagged(window)]
    args: list[Any] = [86_400_000, 2, 1, b"payload", now - 5000, 1 | 2 | 4, 0, "13800000001"]
    args += [f"{number}|13800000001", window + 3_600_000]
    stream_id, _flagged = await CdrStore._ingest(cdr, keys, args)
    assert admin.xlen(bucket.stream) == 1
    assert await cdr.xread({bucket.stream: "0"}, count=1)
    assert stream_id
    # The store's real call: with the outbox of the bucket's slot (cdr.created) and the slot's hint.
    settings = CdrSettings.from_env(Env({}))
    cdr_store = CdrStore(cdr, settings, ConcurrencyLimit(4, wait_seconds=1, name="r"))
    valid = ValidCdr(0, _cdr(number, now - 60_000), now - 60_000, False, 0, None)
    assert all(await cdr_store.ingest("t-acl-events", [valid], now))
    events_bucket = Bucket("t-acl-events")
    assert [e["ty"] for e in outbox(admin, events_bucket.stream)] == ["cdr.created"]
    assert hinted(admin, events_bucket.stream)


def _cdr(number: str, call_ms: int) -> Any:
    record = cdr_pb2.CallDetailRecord(
        call_id="acl-" + _unique(),
        calling_number="13800000001",
        called_number=number,
        target_number="13900000002",
        call_type=cdr_pb2.CALL_TYPE_PEER_TO_A,
        release_direction=cdr_pb2.RELEASE_DIRECTION_CALLER,
        release_cause=16,
        carrier_id="cmcc",
        tenant_id="t-acl-events",
    )
    record.call_time.FromMilliseconds(call_ms)
    record.release_time.FromMilliseconds(call_ms + 3000)
    return record


def test_the_events_user_drains_outboxes_and_reads_what_it_renders(acl_redis: AclRedis, admin: redis.Redis) -> None:
    """numprotect-events: every np:ev: key (outboxes, rings, expiries, a tenant's keys, in scripts too); binding
    records, number history and CDR streams read (a script reading a record writes the outbox beside it)."""
    admin.hset("np:b:{b-ev}", mapping={"st": "a", "t": "t1", "ems": "1"})
    admin.xadd("np:cdr:{t:t1}:s", {"p": b"x"})
    admin.zadd("np:nh:{700100000000001}", {"b-ev": 1})
    outbox_key, ring = event_keys.outbox_key_beside("np:b:{b-ev}"), event_keys.ring_key(0)
    admin.xadd(outbox_key, {"ty": "binding.created", "tn": "t1"})
    # The module's Redis is shared: the binding and CDR tests hint their records' slots, one ring in 16 being ring 0.
    admin.delete(ring, event_keys.expiry_ring_key(0))
    admin.sadd(ring, "0")
    events = acl_redis.sync("numprotect-events")
    try:
        assert events.spop(ring) == b"0"
        entries: Any = events.xrange(outbox_key)
        assert events.xdel(outbox_key, entries[0][0]) == 1
        assert events.zadd(event_keys.expiry_ring_key(0), {"0": 5}) == 1
        tenant = event_keys.TenantKeys("t1")
        assert events.xadd(tenant.log, {"id": "evt_1"}) and events.sadd(event_keys.TENANTS_KEY, "t1") == 1
        assert events.hget("np:b:{b-ev}", "st") == b"a" and events.xrange("np:cdr:{t:t1}:s")
        assert events.zrange("np:nh:{700100000000001}", 0, -1) == [b"b-ev"]
        expired = "redis.call('XADD', KEYS[2], '*', 'ty', redis.call('HGET', KEYS[1], 'st')); return 1"
        assert events.eval(expired, 2, "np:b:{b-ev}", outbox_key) == 1
        with pytest.raises(redis.ResponseError, match=r"can't access|NOPERM|no permissions"):
            events.eval("return redis.call('HSET', KEYS[1], 'st', 'x')", 1, "np:b:{b-ev}")
    finally:
        events.close()


def test_translation_translates_and_keeps_the_blocklist_as_its_user(acl_redis: AclRedis, admin: redis.Redis) -> None:
    now = int(time.time() * 1000)
    number = "7001" + _unique() + "004"
    route = Route("b-acl", "t1", MODE_AXB, "13800000001", "13900000002", 0, False, False, now + 600_000)
    admin.set(route.keys(number)[0], route.encode(), px=600_000)
    settings = acl_redis.settings("numprotect-translation")
    client = ScriptClient(settings, SCRIPT)
    keys = [
        lock_key(number),
        f"np:rt:{{{number}}}:c:13800000001",
        f"np:rt:{{{number}}}:n",
        f"np:rt:{{{number}}}:axe",
        f"np:rt:{{{number}}}:e:",
        f"np:rl:{{{number}}}:c:13800000001",
    ]
    try:
        reply = client.evalsha(keys, ["13800000001", "0", "1000", "100", "100", "", f"np:rl:{{{number}}}:b:"], 2.0)
    finally:
        client.close()
    assert reply[0] == 1 and reply[2] == b"b-acl"  # CONNECT to the binding
    assert int(admin.get(keys[5]) or 0) == 1  # its rate counter
    sync = create_sync_redis(settings)
    try:
        blocklist = BlocklistStore(sync, SystemClock())
        blocklist.block(StoredEntry("t1", "13700000001", "spam", now, 0))
        assert [e.calling_number for e in blocklist.entries("t1")] == ["13700000001"]
    finally:
        sync.close()


def test_a_wrong_password_fails_the_health_probe_and_names_no_password(acl_redis: AclRedis, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password-" + secrets.token_hex(8))
    env = {**acl_redis.env("numprotect-translation"), "NUMPROTECT_REDIS_PASSWORD_FILE": str(wrong)}
    settings = RedisSettings.from_env(Env(env))
    probe = create_sync_redis(settings, max_connections=2)
    try:
        assert not sync_redis_is_up(probe)
        with pytest.raises(redis.AuthenticationError) as caught:
            probe.ping()
    finally:
        probe.close()
    secret = wrong.read_text()
    assert secret not in str(caught.value) and secret not in repr(settings)
    client = ScriptClient(settings, SCRIPT)
    with pytest.raises(Exception, match="refused the connection: WRONGPASS") as refused:
        client.evalsha(["np:lock:{1}", "a", "b", "c", "d", "np:rl:{1}:c:1"], ["1", "0", "1", "1", "1", "", "x"], 1.0)
    assert secret not in str(refused.value)


def test_every_user_of_the_table_is_used_by_a_service_or_the_tooling() -> None:
    assert set(SERVICE_USERS.values()) | {ADMIN_USER} == {user.name for user in ACL_USERS}
    assert acl_user("numprotect-translation").keys  # its key patterns exist
