"""A local certificate authority for `make run` and the tests: never for production (docs/deploy.md: cert-manager).

`ensure_dev_pki(directory)` makes, only when absent, a CA (`ca.pem`, `ca-key.pem`) and a server certificate for
localhost, 127.0.0.1 and ::1 (`server.pem`, `server-key.pem`), keys mode 600; a server certificate that expires
within `RENEW_BEFORE` is issued again on the next run. `DevPki.issue` makes a workload certificate with a SPIFFE-style
URI SAN (spiffe://numprotect/<kind>/<id>) for mTLS. Every certificate may serve both as server and as client
certificate, as one workload certificate does in mTLS mode (tls.py). Files are replaced atomically, so a process that
reloads them (tls.server_credentials) never reads half a file.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_LIFETIME = datetime.timedelta(days=3650)
CERT_LIFETIME = datetime.timedelta(days=365)
# A server certificate closer than this to its end is issued again on the next run.
RENEW_BEFORE = datetime.timedelta(days=30)
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")

Key = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate (PEM, with no chain: the dev CA signs directly) and its private key, as files."""

    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class DevPki:
    """The local CA and its server certificate, as files in one directory."""

    directory: Path

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key_file(self) -> Path:
        return self.directory / "ca-key.pem"

    @property
    def server(self) -> IssuedCertificate:
        return IssuedCertificate(self.directory / "server.pem", self.directory / "server-key.pem")

    def tls_env(self, client_auth: str = "none") -> dict[str, str]:
        """The NUMPROTECT_TLS_* settings of a service serving the server certificate (tls.TlsSettings)."""
        return {
            "NUMPROTECT_TLS": "on",
            "NUMPROTECT_TLS_CERT_FILE": str(self.server.cert_file),
            "NUMPROTECT_TLS_KEY_FILE": str(self.server.key_file),
            "NUMPROTECT_TLS_CA_FILE": str(self.ca_file),
            "NUMPROTECT_TLS_CLIENT_AUTH": client_auth,
        }

    def issue(
        self,
        name: str,
        spiffe_id: str | None,
        directory: Path,
        *,
        hosts: Sequence[str] = (),
        lifetime: datetime.timedelta = CERT_LIFETIME,
    ) -> IssuedCertificate:
        """A certificate signed by this CA, written as `<name>.pem` and `<name>-key.pem` (mode 600) in `directory`:
        URI SAN `spiffe_id` (spiffe://numprotect/<kind>/<id>) when given, plus DNS or IP SANs for `hosts`."""
        ca_key = serialization.load_pem_private_key(self.ca_key_file.read_bytes(), password=None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        ca_cert = x509.load_pem_x509_certificate(self.ca_file.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [_host_name(host) for host in hosts]
        if spiffe_id is not None:
            names.append(x509.UniformResourceIdentifier(spiffe_id))
        cert = _signed(
            _builder(name, key, lifetime)
            .issuer_name(ca_cert.subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
            )  # digital_signature only (ECDSA)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False),
            ca_key,
        )
        issued = IssuedCertificate(directory / f"{name}.pem", directory / f"{name}-key.pem")
        directory.mkdir(parents=True, exist_ok=True)
        # The key first: a reader that sees the new certificate finds its key already there.
        write_atomically(issued.key_file, _key_pem(key), mode=0o600)
        write_atomically(issued.cert_file, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        return issued


def ensure_dev_pki(directory: Path, *, now: datetime.datetime | None = None) -> DevPki:
    """The PKI in `directory`, made where absent: a new CA when none is usable (which re-issues the server
    certificate too), a new server certificate when it is missing or expires within RENEW_BEFORE."""
    now = now or datetime.datetime.now(datetime.UTC)
    pki = DevPki(directory)
    directory.mkdir(parents=True, exist_ok=True)
    new_ca = not _usable(pki.ca_file, now, datetime.timedelta(0)) or not pki.ca_key_file.exists()
    if new_ca:
        _make_ca(pki)
    if new_ca or not pki.server.key_file.exists() or not _usable(pki.server.cert_file, now, RENEW_BEFORE):
        pki.issue("server", None, directory, hosts=LOCAL_HOSTS)
    return pki


def write_atomically(path: Path, data: bytes, *, mode: int) -> None:
    """Writes `data` to a temporary file beside `path` with `mode`, then renames it over `path`."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(descriptor, mode)
        with os.fdopen(descriptor, "wb") as out:
            out.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _usable(cert_file: Path, now: datetime.datetime, margin: datetime.timedelta) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError):
        return False
    return cert.not_valid_before_utc <= now and now + margin < cert.not_valid_after_utc


def _make_ca(pki: DevPki) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _signed(
        _builder("numprotect local development CA", key, CA_LIFETIME)
        .issuer_name(_name("numprotect local development CA"))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True),
        key,
    )
    write_atomically(pki.ca_key_file, _key_pem(key), mode=0o600)
    write_atomically(pki.ca_file, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _builder(common_name: str, key: Key, lifetime: datetime.timedelta) -> x509.CertificateBuilder:
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)  # a little clock skew
    return (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + lifetime)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _signed(builder: x509.CertificateBuilder, signer: Key) -> x509.Certificate:
    return builder.sign(signer, hashes.SHA256())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "numprotect"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _host_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _key_pem(key: Key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
