"""The tests' TLS: one local PKI per test process (dev_pki, in a temporary folder) and clients that trust it.

Every service a test starts (in-process or as a process) serves TLS with the PKI's server certificate (localhost,
127.0.0.1, ::1) unless the test sets NUMPROTECT_TLS=off itself. `token` adds `authorization: Bearer <token>` to
every call of a channel (grpc's access-token call credentials), the hook of the identity layer's tests.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path

import grpc

from numprotect.core.dev_pki import DevPki, IssuedCertificate, ensure_dev_pki
from numprotect.core.settings import Env
from numprotect.core.tls import TlsSettings


def _pki_directory() -> Path:
    # One per test process: ensure_dev_pki makes it on the first call and only reads it afterwards.
    return Path(tempfile.gettempdir()) / f"numprotect-test-pki-{os.getpid()}"


# Threads that start service processes in parallel (tests/allocation/test_concurrency.py) each ask for the PKI: made
# by two at once, a process could get a server certificate of another CA than the one the clients trust.
_MAKING = threading.Lock()


def test_pki() -> DevPki:
    """The session's CA and server certificate (made on first use, by one thread)."""
    with _MAKING:
        return ensure_dev_pki(_pki_directory())


test_pki.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test, for pytest's collector


def remove_test_pki() -> None:
    shutil.rmtree(_pki_directory(), ignore_errors=True)


def tls_env(client_auth: str = "none") -> dict[str, str]:
    """NUMPROTECT_TLS_* of a service serving the test PKI's server certificate."""
    return test_pki().tls_env(client_auth)


def with_tls(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` over the test PKI's TLS settings: a test's own NUMPROTECT_TLS* values win."""
    return {**tls_env(), **environ}


def server_tls(client_auth: str = "none") -> TlsSettings:
    """The TlsSettings of a server serving the test PKI's server certificate."""
    return TlsSettings.from_env(Env(tls_env(client_auth)))


def tls_is_on(environ: Mapping[str, str]) -> bool:
    return TlsSettings.from_env(Env(with_tls(environ))).enabled


def client_credentials(
    token: str | None = None, *, client: IssuedCertificate | None = None, ca_file: Path | None = None
) -> grpc.ChannelCredentials:
    """Trusts the test CA (or `ca_file`); presents `client`'s certificate when given; sends `token` as a bearer."""
    root = (ca_file or test_pki().ca_file).read_bytes()
    if client is None:
        credentials = grpc.ssl_channel_credentials(root_certificates=root)
    else:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=root,
            private_key=client.key_file.read_bytes(),
            certificate_chain=client.cert_file.read_bytes(),
        )
    if token is None:
        return credentials
    return grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))


def secure_channel(
    address: str, token: str | None = None, *, client: IssuedCertificate | None = None
) -> grpc.aio.Channel:
    """A grpc.aio TLS channel to `address` (127.0.0.1:<port>: the server certificate names that IP)."""
    return grpc.aio.secure_channel(address, client_credentials(token, client=client))


def sync_secure_channel(
    address: str, token: str | None = None, *, client: IssuedCertificate | None = None
) -> grpc.Channel:
    """The same as a blocking channel."""
    return grpc.secure_channel(address, client_credentials(token, client=client))


def channel_for(address: str, environ: Mapping[str, str], token: str | None = None) -> grpc.aio.Channel:
    """A TLS channel, or a plaintext one to a service that `environ` (its settings) has set NUMPROTECT_TLS=off."""
    return secure_channel(address, token) if tls_is_on(environ) else grpc.aio.insecure_channel(address)


def sync_channel_for(address: str, environ: Mapping[str, str], token: str | None = None) -> grpc.Channel:
    return sync_secure_channel(address, token) if tls_is_on(environ) else grpc.insecure_channel(address)
