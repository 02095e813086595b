"""Transport security of every gRPC port: TLS by default, mTLS as a deployment mode, certificates that reload.

One workload certificate (NUMPROTECT_TLS_CERT_FILE / _KEY_FILE) is the server certificate and, in mTLS mode, the
client certificate of this process's calls to its peers; its URI SAN (spiffe://numprotect/service/<name>) names
the workload. NUMPROTECT_TLS_CA_FILE verifies the servers this process calls and, in mTLS mode, the clients.
The server re-reads the three files when one of them changes (a stat per new connection, a parse per change), so a
renewed certificate (cert-manager rewrites the Secret's files) is served without a restart; a channel reads them
when it is made.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from numprotect.core.settings import Env, SettingsError

log = logging.getLogger(__name__)

ClientAuth = Literal["none", "require"]
CLIENT_AUTH_MODES: tuple[ClientAuth, ...] = ("none", "require")
# Set by grpc core on a verified peer certificate with exactly one URI SAN that is a valid SPIFFE ID.
_SPIFFE_PROPERTY = "peer_spiffe_id"


@dataclass(frozen=True)
class CertificateFiles:
    """Where the workload's certificate chain, its key and the CA bundle are."""

    cert_file: Path
    key_file: Path
    ca_file: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(chain, key, CA) as PEM bytes, checked: each parses and the key belongs to the first certificate.
        Raises OSError or ValueError naming the file at fault."""
        chain, key, ca = (path.read_bytes() for path in (self.cert_file, self.key_file, self.ca_file))
        certificates = _certificates(chain, self.cert_file)
        _certificates(ca, self.ca_file)
        try:
            private_key = serialization.load_pem_private_key(key, password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{self.key_file}: not an unencrypted PEM private key") from exc
        if private_key.public_key() != certificates[0].public_key():
            raise ValueError(f"{self.key_file}: is not the key of the certificate in {self.cert_file}")
        return chain, key, ca

    def stamp(self) -> tuple[tuple[int, int, int], ...]:
        """What changes when one of the files is rewritten or replaced (a Secret volume swaps a symlink)."""
        stats = (os.stat(path) for path in (self.cert_file, self.key_file, self.ca_file))
        return tuple((stat.st_ino, stat.st_mtime_ns, stat.st_size) for stat in stats)


def _certificates(pem: bytes, path: Path) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise ValueError(f"{path}: no PEM certificate in it") from exc
    return certificates


@dataclass(frozen=True)
class TlsSettings:
    """NUMPROTECT_TLS (on|off), the certificate files and NUMPROTECT_TLS_CLIENT_AUTH (none|require)."""

    enabled: bool
    files: CertificateFiles | None
    client_auth: ClientAuth = "none"

    @classmethod
    def off(cls) -> TlsSettings:
        return cls(enabled=False, files=None)

    @classmethod
    def from_env(cls, env: Env) -> TlsSettings:
        if env.choice("NUMPROTECT_TLS", "on", ("on", "off")) == "off":
            return cls.off()
        paths = []
        for variable in ("NUMPROTECT_TLS_CERT_FILE", "NUMPROTECT_TLS_KEY_FILE", "NUMPROTECT_TLS_CA_FILE"):
            raw = env.raw(variable)
            if raw is None:
                raise SettingsError(f"{variable}: required while NUMPROTECT_TLS=on (or set NUMPROTECT_TLS=off)")
            path = Path(raw)
            try:
                path.read_bytes()
            except OSError as exc:
                raise SettingsError(f"{variable}={raw!r}: cannot be read ({exc.strerror})") from None
            paths.append(path)
        files = CertificateFiles(*paths)
        try:
            files.read()
        except ValueError as exc:
            raise SettingsError(f"NUMPROTECT_TLS_*_FILE: {exc}") from None
        client_auth: ClientAuth = (
            "require" if env.choice("NUMPROTECT_TLS_CLIENT_AUTH", "none", CLIENT_AUTH_MODES) == "require" else "none"
        )
        return cls(enabled=True, files=files, client_auth=client_auth)

    def required_files(self) -> CertificateFiles:
        if self.files is None:
            raise ValueError("TLS is off: no certificate files")
        return self.files


class ReloadingCertificates:
    """The certificate-configuration fetcher of a server: called by grpc before each TLS handshake, it stats the
    files and parses them only when they changed; a broken new set keeps the current one and logs once."""

    def __init__(self, files: CertificateFiles) -> None:
        self._files = files
        self._lock = threading.Lock()  # handshakes come from several grpc threads
        self._stamp = files.stamp()
        self.initial = self._configuration(*files.read())
        self._rejected: object = None
        self.reloads = 0

    def _configuration(self, chain: bytes, key: bytes, ca: bytes) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=ca)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            try:
                stamp = self._files.stamp()
            except OSError as exc:  # mid-replacement: keep serving what we have
                self._reject(("unreadable", exc.filename), exc)
                return None
            if stamp == self._stamp:
                return None
            try:
                configuration = self._configuration(*self._files.read())
            except (OSError, ValueError) as exc:
                self._reject(stamp, exc)
                return None
            self._stamp = stamp
            self._rejected = None
            self.reloads += 1
        log.info("TLS certificates reloaded", extra={"cert_file": str(self._files.cert_file)})
        return configuration

    def _reject(self, state: object, error: Exception) -> None:
        if state != self._rejected:  # once per broken state, not on every handshake
            self._rejected = state
            log.warning("TLS certificate files not reloaded: the current ones stay", extra={"error": str(error)})


def server_credentials(settings: TlsSettings) -> grpc.ServerCredentials:
    """Credentials of a secure port: the workload certificate, reloaded on change; in mTLS mode a client without
    a certificate from the CA is refused at the handshake."""
    require = settings.client_auth == "require"
    fetcher = ReloadingCertificates(settings.required_files())
    # grpc-stubs types the fetcher as never returning None; grpc documents None as "keep the current configuration".
    return grpc.dynamic_ssl_server_credentials(
        fetcher.initial,
        fetcher,  # type: ignore[arg-type]
        require_client_authentication=require,
    )


def channel_credentials(settings: TlsSettings) -> grpc.ChannelCredentials:
    """Credentials of a channel to a peer: trusts the CA; in mTLS mode presents the workload certificate."""
    chain, key, ca = settings.required_files().read()
    if settings.client_auth == "require":
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=chain)
    return grpc.ssl_channel_credentials(root_certificates=ca)


class _HasAuthContext(Protocol):
    def auth_context(self) -> dict[str, list[bytes]]: ...


def peer_spiffe_id(context: _HasAuthContext) -> str | None:
    """The SPIFFE ID (URI SAN) of the call's verified client certificate, or None without one.

    grpc core verifies the chain against the CA (mTLS mode) and sets `peer_spiffe_id` only when the certificate has
    exactly one URI SAN and it is a valid SPIFFE ID: a certificate naming two workloads names none. Works for
    grpc.ServicerContext and grpc.aio.ServicerContext alike.
    """
    values = context.auth_context().get(_SPIFFE_PROPERTY) or []
    if len(values) != 1:
        return None
    return values[0].decode("utf-8", errors="strict")
