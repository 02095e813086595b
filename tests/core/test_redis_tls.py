"""rediss:// on a real redis-server with TLS (trustme's throwaway CAs): every client verifies the server.

ScriptClient (translation's hot path) and the redis-py clients (asyncio, blocking, the health probe's) talk to a
TLS Redis with the CA file, authenticate as an ACL user inside TLS, present a client certificate when Redis
requires one, and refuse a server certificate from another CA. The settings refuse, in one line, a TLS request
that cannot be honoured.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import trustme

from numprotect.core.errors import Unavailable
from numprotect.core.redis_acl import ACL_USERS, ADMIN_USER, render_acl_file
from numprotect.core.redis_client import create_redis, create_sync_redis, sync_redis_is_up
from numprotect.core.settings import Env, RedisSettings, SettingsError
from numprotect.services.translation.core import SCRIPT
from numprotect.services.translation.fastredis import ScriptClient
from support.redis_server import RedisServer, ServerTls

KEYS = ["np:lock:{700100000000001}", "np:rt:{700100000000001}:c:1", "np:rt:{700100000000001}:n"]
KEYS += ["np:rt:{700100000000001}:axe", "np:rt:{700100000000001}:e:", "np:rl:{700100000000001}:c:1"]
ARGS = ["13800000001", "0", "1000", "100", "100", "", "np:rl:{700100000000001}:b:"]
NO_ROUTE = [2, 1]  # REJECT, no route (translate.lua)


class Pki:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca = trustme.CA()
        self.other_ca = trustme.CA()
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        self.server_cert, self.server_key = self.write("server", server)
        self.client_cert, self.client_key = self.write("client", self.ca.issue_cert("client.numprotect"))
        self.ca_file = folder / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.other_ca_file = folder / "other-ca.pem"
        self.other_ca.cert_pem.write_to_path(str(self.other_ca_file))

    def write(self, name: str, cert: trustme.LeafCert) -> tuple[Path, Path]:
        cert_file, key_file = self.folder / f"{name}.pem", self.folder / f"{name}.key"
        cert.cert_chain_pems[0].write_to_path(str(cert_file))
        cert.private_key_pem.write_to_path(str(key_file))
        return cert_file, key_file


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_redis(pki: Pki) -> Iterator[RedisServer]:
    """TLS only, ACL users (the password of each is its name reversed), client certificates optional."""
    acl = pki.folder / "users.acl"
    acl.write_text(render_acl_file({user.name: user.name[::-1] for user in ACL_USERS}))
    tls = ServerTls(pki.server_cert, pki.server_key, pki.ca_file, auth_clients="optional")
    server = RedisServer("--aclfile", str(acl), auth=(ADMIN_USER, ADMIN_USER[::-1]), tls=tls)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_redis(pki: Pki) -> Iterator[RedisServer]:
    """TLS only, a client certificate required, the default user (no ACL file)."""
    tls = ServerTls(pki.server_cert, pki.server_key, pki.ca_file, "yes", (pki.client_cert, pki.client_key))
    server = RedisServer(tls=tls)
    yield server
    server.stop()


def _settings(server: RedisServer, ca_file: Path, tmp_path: Path, **extra: str) -> RedisSettings:
    password = tmp_path / "translation.password"
    password.write_text("numprotect-translation"[::-1])
    env = {
        "NUMPROTECT_REDIS_URL": server.url,
        "NUMPROTECT_REDIS_CA_FILE": str(ca_file),
        "NUMPROTECT_REDIS_USERNAME": "numprotect-translation",
        "NUMPROTECT_REDIS_PASSWORD_FILE": str(password),
        **extra,
    }
    return RedisSettings.from_env(Env(env))


def test_script_client_speaks_tls_and_authenticates_inside_it(tls_redis: RedisServer, pki: Pki, tmp_path: Path) -> None:
    settings = _settings(tls_redis, pki.ca_file, tmp_path)
    assert settings.url.startswith("rediss://") and settings.tls is not None
    client = ScriptClient(settings, SCRIPT)
    try:
        assert client.evalsha(KEYS, ARGS, 2.0) == NO_ROUTE
        assert client.evalsha_many([(KEYS, ARGS), (KEYS, ARGS)], 2.0) == [NO_ROUTE, NO_ROUTE]
    finally:
        client.close()
    # Plaintext on the TLS port gets nowhere (what the old client did with a rediss:// URL).
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host="127.0.0.1", port=tls_redis.port, socket_timeout=1).ping()


def test_script_client_refuses_a_server_certificate_from_another_ca(
    tls_redis: RedisServer, pki: Pki, tmp_path: Path
) -> None:
    client = ScriptClient(_settings(tls_redis, pki.other_ca_file, tmp_path), SCRIPT)
    with pytest.raises(Unavailable, match="certificate verify failed"):
        client.evalsha(KEYS, ARGS, 2.0)


def test_script_client_checks_the_hostname(pki: Pki) -> None:
    """A certificate of the right CA for another name is refused: this server's names only 127.0.0.1."""
    cert, key = pki.write("ip-only", pki.ca.issue_cert("127.0.0.1"))
    server = RedisServer(tls=ServerTls(cert, key, pki.ca_file))
    try:
        url = server.url.replace("127.0.0.1", "localhost")
        settings = RedisSettings.from_env(
            Env({"NUMPROTECT_REDIS_URL": url, "NUMPROTECT_REDIS_CA_FILE": str(pki.ca_file)})
        )
        with pytest.raises(Unavailable, match="certificate verify failed"):
            ScriptClient(settings, SCRIPT).evalsha(KEYS, ARGS, 2.0)
    finally:
        server.stop()


def test_script_client_presents_its_client_certificate(mtls_redis: RedisServer, pki: Pki) -> None:
    base = {"NUMPROTECT_REDIS_URL": mtls_redis.url, "NUMPROTECT_REDIS_CA_FILE": str(pki.ca_file)}
    with pytest.raises(Unavailable):
        ScriptClient(RedisSettings.from_env(Env(base)), SCRIPT).evalsha(KEYS, ARGS, 2.0)
    with_cert = {
        **base,
        "NUMPROTECT_REDIS_CLIENT_CERT_FILE": str(pki.client_cert),
        "NUMPROTECT_REDIS_CLIENT_KEY_FILE": str(pki.client_key),
    }
    settings = RedisSettings.from_env(Env(with_cert))
    assert ScriptClient(settings, SCRIPT).evalsha(KEYS, ARGS, 2.0) == NO_ROUTE
    probe = create_sync_redis(settings, max_connections=2)
    assert sync_redis_is_up(probe)
    probe.close()


async def test_redis_py_clients_verify_the_server_with_the_ca_file(
    tls_redis: RedisServer, pki: Pki, tmp_path: Path
) -> None:
    settings = _settings(tls_redis, pki.ca_file, tmp_path)
    client = create_redis(settings)
    try:
        assert await client.ping()
        assert await client.get("np:rt:{700100000000001}:n") is None
    finally:
        await client.aclose()
    probe = create_sync_redis(settings, max_connections=2)
    try:
        assert sync_redis_is_up(probe)
        with pytest.raises(redis.exceptions.NoPermissionError):
            probe.flushall()
    finally:
        probe.close()
    wrong = create_sync_redis(_settings(tls_redis, pki.other_ca_file, tmp_path), max_connections=2)
    try:
        assert not sync_redis_is_up(wrong)
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            wrong.ping()
    finally:
        wrong.close()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NUMPROTECT_REDIS_URL": "rediss://127.0.0.1:6380/0"}, "NUMPROTECT_REDIS_CA_FILE: required with a rediss://"),
        (
            {"NUMPROTECT_REDIS_URL": "redis://127.0.0.1:6379/0", "NUMPROTECT_REDIS_CA_FILE": "system"},
            "NUMPROTECT_REDIS_CA_FILE asks for TLS but NUMPROTECT_REDIS_URL is redis://",
        ),
        (
            {"NUMPROTECT_REDIS_URL": "unix:///tmp/r.sock", "NUMPROTECT_REDIS_CLIENT_CERT_FILE": "/c.pem"},
            "NUMPROTECT_REDIS_CLIENT_CERT_FILE asks for TLS but NUMPROTECT_REDIS_URL is unix://",
        ),
        (
            {"NUMPROTECT_REDIS_URL": "rediss://h:6380/0", "NUMPROTECT_REDIS_CA_FILE": "/nowhere/ca.pem"},
            "NUMPROTECT_REDIS_CA_FILE='/nowhere/ca.pem': no such file",
        ),
        (
            {"NUMPROTECT_REDIS_URL": "rediss://h:6380/0?ssl_cert_reqs=none", "NUMPROTECT_REDIS_CA_FILE": "system"},
            "option 'ssl_cert_reqs' is not taken from the URL",
        ),
        (
            {"NUMPROTECT_REDIS_URL": "rediss://h/0", "NUMPROTECT_REDIS_CA_FILE": "system",
             "NUMPROTECT_REDIS_CLIENT_KEY_FILE": "/k"},
            "NUMPROTECT_REDIS_CLIENT_KEY_FILE needs NUMPROTECT_REDIS_CLIENT_CERT_FILE",
        ),
    ],
)  # fmt: skip
def test_tls_that_cannot_be_honoured_refuses_start_up_in_one_line(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        RedisSettings.from_env(Env(env))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_ca_file_that_is_no_certificate_refuses_start_up(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    env = {"NUMPROTECT_REDIS_URL": "rediss://h:6380/0", "NUMPROTECT_REDIS_CA_FILE": str(bad)}
    with pytest.raises(SettingsError, match="Redis TLS cannot be set up"):
        RedisSettings.from_env(Env(env))


def test_script_client_never_opens_plaintext_for_rediss() -> None:
    """Settings built by hand with a rediss:// URL and no TLS: refused, not silently plaintext."""
    settings = RedisSettings(url="rediss://127.0.0.1:6380/0", mode="standalone", timeout_seconds=1, max_connections=1)
    with pytest.raises(SettingsError, match="TLS settings do not match"):
        ScriptClient(settings, SCRIPT)


def test_system_trust_is_an_explicit_choice() -> None:
    settings = RedisSettings.from_env(
        Env({"NUMPROTECT_REDIS_URL": "rediss://redis.example:6380/0", "NUMPROTECT_REDIS_CA_FILE": "system"})
    )
    assert settings.tls is not None and settings.tls.ca_file is None
    context = settings.tls.context()
    assert context.check_hostname and context.verify_mode.name == "CERT_REQUIRED"
