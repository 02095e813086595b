"""Transport security against real servers on loopback: TLS on every service port, mTLS refusing at the handshake,
the client certificate's SPIFFE ID, certificates reloaded without a restart, the health-only plaintext port, and
settings errors in one line."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from numprotect.core.dev_pki import DevPki, ensure_dev_pki, write_atomically
from numprotect.core.identity.api_keys import AuthSettings
from numprotect.core.identity.runtime import Identity
from numprotect.core.server import LIVENESS_NAME, AioServiceApp, SyncServiceApp
from numprotect.core.settings import SERVICE_NAMES, Env, RedisSettings, ServerSettings, SettingsError
from numprotect.core.telemetry import Telemetry
from numprotect.core.tls import TlsSettings, peer_spiffe_id, server_credentials
from support.grpcurl import run_grpcurl_plaintext
from support.processes import ROOT, ServiceProcess
from support.redis_server import free_port
from support.tls import client_credentials, server_tls, sync_secure_channel, test_pki

SERVING = health_pb2.HealthCheckResponse.SERVING
CARRIER = "spiffe://numprotect/carrier/c1"


def _no_identity() -> Identity:
    """No identity concern (NUMPROTECT_AUTH=off): these servers serve only health, which needs no key."""
    return Identity(AuthSettings.from_env(Env({"NUMPROTECT_AUTH": "off"})), RedisSettings.from_env(Env({})))


class _PeerRecorder(health.HealthServicer):
    """Health whose Check remembers the SPIFFE ID of each caller: the identity layer's view of the call."""

    def __init__(self) -> None:
        super().__init__()
        self.peers: list[str | None] = []

    def Check(self, request: Any, context: Any) -> Any:  # noqa: N802 (grpc's name)
        self.peers.append(peer_spiffe_id(context))
        return health_pb2.HealthCheckResponse(status=SERVING)


@pytest.fixture
def server_pki(tmp_path: Path) -> DevPki:
    """A PKI of the test's own, whose files the test may replace."""
    return ensure_dev_pki(tmp_path / "pki")


def _settings(pki: DevPki, client_auth: str = "none") -> TlsSettings:
    return TlsSettings.from_env(Env(pki.tls_env(client_auth)))


@pytest.fixture
def mtls_server(server_pki: DevPki) -> Iterator[tuple[str, _PeerRecorder]]:
    """A thread-pool grpc server with the bootstrap's credentials in mTLS mode."""
    recorder = _PeerRecorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(recorder, server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(_settings(server_pki, "require")))
    server.start()
    yield f"127.0.0.1:{port}", recorder
    server.stop(None)


def _status(channel: grpc.Channel, name: str = "") -> int:
    request = health_pb2.HealthCheckRequest(service=name)
    return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status)


def _check(address: str, credentials: grpc.ChannelCredentials) -> int:
    """Health/Check on a connection of its own (no subchannel shared with an earlier channel)."""
    with grpc.secure_channel(address, credentials, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        return _status(channel)


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_a_plaintext_client_cannot_call_the_service_and_a_tls_client_can(service: str, redis_url: str) -> None:
    process = ServiceProcess(service, {"NUMPROTECT_REDIS_URL": redis_url})
    try:
        plaintext = run_grpcurl_plaintext(
            "-connect-timeout", "2", "-d", '{"service":""}', process.address, "grpc.health.v1.Health/Check"
        )
        assert plaintext.returncode != 0 and "SERVING" not in plaintext.stdout
        with grpc.insecure_channel(process.address) as channel, pytest.raises(grpc.RpcError) as refused:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # sip's overall health also needs a TranslateStream up (no translation runs here); liveness only the process.
        with process.channel() as channel:
            assert _status(channel, LIVENESS_NAME if service == "sip" else "") == SERVING
        # A client that trusts another CA refuses the server: the certificate is really checked.
        other = ensure_dev_pki(Path(process.env["NUMPROTECT_TLS_CA_FILE"]).parent / f"other-{os.getpid()}")
        with pytest.raises(grpc.RpcError) as distrusted:
            _check(process.address, client_credentials(ca_file=other.ca_file))
        assert distrusted.value.code() == grpc.StatusCode.UNAVAILABLE
        serving = "\n".join(process.lines)
        assert '"tls": "on"' in serving and '"client_certificates": "none"' in serving
    finally:
        assert process.stop() == 0


def test_mtls_refuses_a_client_without_a_certificate_at_the_handshake(
    mtls_server: tuple[str, _PeerRecorder], server_pki: DevPki
) -> None:
    address, recorder = mtls_server
    with pytest.raises(grpc.RpcError) as refused:
        _check(address, client_credentials(ca_file=server_pki.ca_file))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert recorder.peers == []  # no call reached the servicer


def test_mtls_refuses_a_client_certificate_from_another_ca(
    mtls_server: tuple[str, _PeerRecorder], server_pki: DevPki, tmp_path: Path
) -> None:
    address, recorder = mtls_server
    stranger = ensure_dev_pki(tmp_path / "stranger").issue("carrier", CARRIER, tmp_path / "stranger-clients")
    with pytest.raises(grpc.RpcError) as refused:
        _check(address, client_credentials(client=stranger, ca_file=server_pki.ca_file))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert recorder.peers == []


def test_mtls_accepts_a_good_client_certificate_and_names_its_spiffe_id(
    mtls_server: tuple[str, _PeerRecorder], server_pki: DevPki, tmp_path: Path
) -> None:
    address, recorder = mtls_server
    carrier = server_pki.issue("carrier", CARRIER, tmp_path / "clients")
    assert _check(address, client_credentials(client=carrier, ca_file=server_pki.ca_file)) == SERVING
    # A certificate without a URI SAN is a verified client that names no workload.
    anonymous = server_pki.issue("anonymous", None, tmp_path / "clients", hosts=("client.example",))
    assert _check(address, client_credentials(client=anonymous, ca_file=server_pki.ca_file)) == SERVING
    assert recorder.peers == [CARRIER, None]


async def test_peer_spiffe_id_on_a_grpc_aio_server(server_pki: DevPki, tmp_path: Path) -> None:
    seen: list[str | None] = []

    class Recorder(health.aio.HealthServicer):  # type: ignore[name-defined,misc]
        async def Check(self, request: Any, context: Any) -> Any:  # noqa: N802
            seen.append(peer_spiffe_id(context))
            return health_pb2.HealthCheckResponse(status=SERVING)

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(Recorder(), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(_settings(server_pki, "require")))
    await server.start()
    try:
        binding = server_pki.issue("binding", "spiffe://numprotect/service/binding", tmp_path / "clients")
        credentials = client_credentials(client=binding, ca_file=server_pki.ca_file)
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == SERVING
        assert seen == ["spiffe://numprotect/service/binding"]
    finally:
        await server.stop(None)


def test_certificates_replaced_on_disk_are_served_on_the_next_connection(server_pki: DevPki, tmp_path: Path) -> None:
    """The server's files are swapped for a certificate of another CA while it runs: the next connection gets the
    new one (a client trusting only the new CA gets in, one trusting only the old CA no longer does). A broken file
    written after that keeps the last good certificate."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=[("grpc.so_reuseport", 0)])
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    served = server_pki.server
    port = server.add_secure_port("127.0.0.1:0", server_credentials(_settings(server_pki)))
    server.start()
    address = f"127.0.0.1:{port}"
    old_ca, new = server_pki.ca_file.read_bytes(), ensure_dev_pki(tmp_path / "renewed")
    (tmp_path / "old-ca.pem").write_bytes(old_ca)
    try:
        assert _check(address, client_credentials(ca_file=tmp_path / "old-ca.pem")) == SERVING
        with pytest.raises(grpc.RpcError):
            _check(address, client_credentials(ca_file=new.ca_file))
        # What cert-manager does to a Secret volume, file by file (the key first, then the chain, then the CA).
        for source, target in (
            (new.server.key_file, served.key_file),
            (new.server.cert_file, served.cert_file),
            (new.ca_file, server_pki.ca_file),
        ):
            write_atomically(target, source.read_bytes(), mode=0o600)
        assert _check(address, client_credentials(ca_file=new.ca_file)) == SERVING
        with pytest.raises(grpc.RpcError):
            _check(address, client_credentials(ca_file=tmp_path / "old-ca.pem"))
        write_atomically(served.cert_file, b"-----BEGIN CERTIFICATE-----\nbroken\n", mode=0o600)
        assert _check(address, client_credentials(ca_file=new.ca_file)) == SERVING
    finally:
        server.stop(None)


def test_the_health_port_serves_plaintext_health_and_nothing_else(redis_url: str) -> None:
    health_port = free_port()
    settings = ServerSettings.from_env(
        Env({"NUMPROTECT_BINDING_PORT": "0", "NUMPROTECT_HEALTH_PORT": str(health_port)}), "binding"
    )
    app = SyncServiceApp(
        settings, [], probe=lambda: True, telemetry=Telemetry.disabled(), tls=server_tls(), identity=_no_identity()
    )
    app.start()
    try:
        assert app.health_port == health_port
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
            listing = run_grpcurl_plaintext("-connect-timeout", "2", f"127.0.0.1:{health_port}", "list")
            assert listing.returncode != 0  # no reflection there: health only
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel, pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        with sync_secure_channel(f"127.0.0.1:{app.port}") as channel:
            assert (
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
            )
    finally:
        app.stop()


async def test_the_aio_model_serves_the_health_port_too() -> None:
    health_port = free_port()
    settings = ServerSettings.from_env(
        Env({"NUMPROTECT_CDR_PORT": "0", "NUMPROTECT_HEALTH_PORT": str(health_port), "NUMPROTECT_GRACE_PERIOD": "0"}),
        "cdr",
    )
    app = AioServiceApp(
        settings, [], probe=lambda: True, telemetry=Telemetry.disabled(), tls=server_tls(), identity=_no_identity()
    )
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == SERVING
    finally:
        await app.stop()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"NUMPROTECT_TLS_CERT_FILE": ""}, "NUMPROTECT_TLS_CERT_FILE: required while NUMPROTECT_TLS=on"),
        (
            {"NUMPROTECT_TLS_CA_FILE": "/nonexistent/ca.pem"},
            "NUMPROTECT_TLS_CA_FILE='/nonexistent/ca.pem': cannot be read",
        ),
        (
            {"NUMPROTECT_TLS_CLIENT_AUTH": "optional"},
            "NUMPROTECT_TLS_CLIENT_AUTH='optional': must be one of none, require",
        ),
        ({"NUMPROTECT_TLS": "maybe"}, "NUMPROTECT_TLS='maybe': must be one of on, off"),
    ],
)
def test_a_bad_tls_setting_is_one_line_naming_the_variable(change: dict[str, str], message: str) -> None:
    environ = {**test_pki().tls_env(), **change}
    with pytest.raises(SettingsError) as error:
        TlsSettings.from_env(Env(environ))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_key_that_is_not_the_certificates_is_refused_at_start_up(tmp_path: Path) -> None:
    pki = test_pki()
    other = pki.issue("other", None, tmp_path)
    environ = {**pki.tls_env(), "NUMPROTECT_TLS_KEY_FILE": str(other.key_file)}
    with pytest.raises(SettingsError, match="is not the key of the certificate"):
        TlsSettings.from_env(Env(environ))


def test_tls_off_needs_no_files_and_the_service_warns_that_it_is_plaintext(redis_url: str) -> None:
    assert TlsSettings.from_env(Env({"NUMPROTECT_TLS": "off"})) == TlsSettings.off()
    process = ServiceProcess("cdr", {"NUMPROTECT_REDIS_URL": redis_url, "NUMPROTECT_TLS": "off"})
    try:
        process.wait_serving()
        with grpc.insecure_channel(process.address) as channel:
            assert (
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
            )
        output = "\n".join(process.lines)
        assert "TLS is off (NUMPROTECT_TLS=off): the port serves plaintext" in output and '"tls": "off"' in output
    finally:
        assert process.stop() == 0


def test_a_service_without_its_certificate_exits_with_one_line(redis_url: str) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NUMPROTECT_")}
    result = subprocess.run(
        [sys.executable, "-m", "numprotect.services.cdr"],
        cwd=ROOT,
        env={**environ, **test_pki().tls_env(), "NUMPROTECT_REDIS_URL": redis_url, "NUMPROTECT_TLS_KEY_FILE": ""},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "numprotect-cdr: NUMPROTECT_TLS_KEY_FILE: required while NUMPROTECT_TLS=on (or set NUMPROTECT_TLS=off)"
    )


def test_dev_pki_keys_are_private_and_a_server_certificate_near_its_end_is_issued_again(tmp_path: Path) -> None:
    pki = ensure_dev_pki(tmp_path)
    for key in (pki.ca_key_file, pki.server.key_file):
        assert key.stat().st_mode & 0o777 == 0o600
    server = x509.load_pem_x509_certificate(pki.server.cert_file.read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    ca_before = pki.ca_file.read_bytes()
    ensure_dev_pki(tmp_path)  # valid: nothing changes
    assert x509.load_pem_x509_certificate(pki.server.cert_file.read_bytes()).serial_number == server.serial_number
    near_the_end = server.not_valid_after_utc - datetime.timedelta(days=10)
    ensure_dev_pki(tmp_path, now=near_the_end)
    renewed = x509.load_pem_x509_certificate(pki.server.cert_file.read_bytes())
    assert renewed.serial_number != server.serial_number and pki.ca_file.read_bytes() == ca_before
    issued = pki.issue("tenant", "spiffe://numprotect/tenant/t1", tmp_path / "clients")
    uris = x509.load_pem_x509_certificate(issued.cert_file.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert uris.value.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://numprotect/tenant/t1"]
    assert issued.key_file.stat().st_mode & 0o777 == 0o600
