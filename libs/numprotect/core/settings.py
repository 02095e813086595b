"""Settings from the environment, validated once at start-up.

A bad value raises SettingsError whose message is one line naming the variable and the rule; the
bootstrap prints it and exits with status 2.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlparse

from numprotect.core.gc_tuning import DEFAULT_GEN0_THRESHOLD
from numprotect.core.scheduling import POLICIES

DEFAULT_PORTS: Mapping[str, int] = {
    "allocation": 50051,
    "binding": 50052,
    "translation": 50053,
    "cdr": 50054,
    "events": 50055,
    "sip": 50056,
}
SERVICE_NAMES = tuple(DEFAULT_PORTS)
# The SIP adapter's NUMPROTECT_SIP_HOST/_PORT name its SIP listener (docs/sip.md), so its gRPC (health) server
# reads NUMPROTECT_SIP_GRPC_HOST/_PORT/_REUSE_PORT; every other service's are NUMPROTECT_<SERVICE>_*.
_SERVER_ENV_PREFIXES: Mapping[str, str] = MappingProxyType({"sip": "NUMPROTECT_SIP_GRPC"})

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class SettingsError(ValueError):
    """A setting that breaks its rule; str() is the one line shown to the operator."""


class Env:
    """Typed, validated access to environment variables."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def raw(self, name: str) -> str | None:
        value = self._environ.get(name)
        return value if value not in (None, "") else None

    def text(self, name: str, default: str) -> str:
        return self.raw(name) or default

    def integer(self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r}: must be an integer") from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise SettingsError(f"{name}={raw!r}: must be between {minimum} and {maximum}")
        return value

    def number(self, name: str, default: float, *, minimum: float = 0.0, maximum: float | None = None) -> float:
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r}: must be a number") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise SettingsError(f"{name}={raw!r}: must be between {minimum} and {maximum}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        raw = self.raw(name)
        if raw is None:
            return default
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name}={raw!r}: must be true or false")

    def seconds(self, name: str, default: float, *, minimum: float = 0.0, maximum: float | None = None) -> float:
        """A duration such as 30, 30s, 500ms, 5m, 2h or 180d, in seconds."""
        raw = self.raw(name)
        if raw is None:
            return default
        match = _DURATION.match(raw.strip())
        if not match:
            raise SettingsError(f"{name}={raw!r}: must be a duration like 500ms, 30s, 5m, 2h or 180d")
        value = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        if value < minimum or (maximum is not None and value > maximum):
            raise SettingsError(f"{name}={raw!r}: must be between {minimum}s and {maximum}s")
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        raw = self.raw(name)
        if raw is None:
            return default
        if raw not in choices:
            raise SettingsError(f"{name}={raw!r}: must be one of {', '.join(choices)}")
        return raw

    def address(self, name: str, default: str) -> str:
        """host:port of another service."""
        raw = self.raw(name) or default
        host, sep, port = raw.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SettingsError(f"{name}={raw!r}: must be host:port with a port from 1 to 65535")
        return raw


_REDIS_TLS_FILES = ("NUMPROTECT_REDIS_CA_FILE", "NUMPROTECT_REDIS_CLIENT_CERT_FILE", "NUMPROTECT_REDIS_CLIENT_KEY_FILE")
# Connection options redis-py would take from the URL's query string over ours: credentials and TLS come from
# their own settings only, so that no URL can turn certificate checks off or carry a password past the rules.
_REDIS_URL_QUERY_REFUSED = re.compile(r"^(ssl.*|username|password|protocol)$")


@dataclass(frozen=True)
class RedisTls:
    """TLS to Redis (rediss://): the server's certificate is verified and its hostname checked, always.

    `ca_file` is the CA that signs Redis's certificate; None means the system trust store (an explicit choice:
    NUMPROTECT_REDIS_CA_FILE=system). `cert_file` and `key_file` are a client certificate for a Redis with
    `tls-auth-clients yes`.
    """

    ca_file: str | None
    cert_file: str | None = None
    key_file: str | None = None

    def context(self) -> ssl.SSLContext:
        """A client context: TLS 1.2 or later, CERT_REQUIRED, hostname checked; only `ca_file` when one is set."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context

    @classmethod
    def from_env(cls, env: Env, scheme: str) -> RedisTls | None:
        """None for redis:// and unix:// (no TLS setting may be set then); a checked context for rediss://."""
        if scheme != "rediss":
            for name in _REDIS_TLS_FILES:
                if env.raw(name) is not None:
                    raise SettingsError(
                        f"{name} asks for TLS but NUMPROTECT_REDIS_URL is {scheme}://: use a rediss:// URL"
                    )
            return None
        ca = env.raw("NUMPROTECT_REDIS_CA_FILE")
        if ca is None:
            raise SettingsError(
                "NUMPROTECT_REDIS_CA_FILE: required with a rediss:// URL: the CA file that signs Redis's "
                "certificate, or 'system' for the system trust store"
            )
        cert = env.raw("NUMPROTECT_REDIS_CLIENT_CERT_FILE")
        key = env.raw("NUMPROTECT_REDIS_CLIENT_KEY_FILE")
        if key is not None and cert is None:
            raise SettingsError("NUMPROTECT_REDIS_CLIENT_KEY_FILE needs NUMPROTECT_REDIS_CLIENT_CERT_FILE")
        tls = cls(None if ca == "system" else ca, cert, key)
        for name, path in zip(_REDIS_TLS_FILES, (tls.ca_file, cert, key), strict=True):
            if path is not None and not Path(path).is_file():
                raise SettingsError(f"{name}={path!r}: no such file")
        try:
            tls.context()  # a CA or key pair that cannot be loaded refuses start-up here, not on the first call
        except (OSError, ssl.SSLError) as exc:
            raise SettingsError(f"Redis TLS cannot be set up from {', '.join(_REDIS_TLS_FILES)}: {exc}") from None
        return tls


@dataclass(frozen=True)
class RedisSettings:
    # Without its password: credentials live in `username` and `password` (never in a repr, log or error).
    url: str
    mode: Literal["standalone", "cluster"]
    # Per-command socket timeout: a slow Redis becomes UNAVAILABLE instead of a hung call.
    timeout_seconds: float
    max_connections: int
    # The ACL user (None: Redis's `default` user) and its password, from NUMPROTECT_REDIS_PASSWORD_FILE or the URL.
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: RedisTls | None = None
    # Acknowledged writes of bindings and CDRs wait (Redis WAIT) until this many replicas of the master that took
    # them have them too, at most `wait_timeout_seconds`; not reached in time, the write is answered UNAVAILABLE.
    # 0 = off (asynchronous replication: a master that dies may lose its last acknowledged writes).
    wait_replicas: int = 0
    wait_timeout_seconds: float = 0.5
    # The client of the write path (binding, allocation): "mux", commands of concurrent calls share one connection
    # per node and one write per loop pass (numprotect.core.redis_mux), or "redis-py" (redis.asyncio, a pool).
    # The other services and the tools use redis-py whatever this says.
    client: Literal["mux", "redis-py"] = "mux"

    @classmethod
    def from_env(cls, env: Env) -> RedisSettings:
        url = env.text("NUMPROTECT_REDIS_URL", "redis://127.0.0.1:6379/0")
        parsed = urlparse(url)
        shown = _without_password(url)  # what an error may show
        if parsed.scheme not in ("redis", "rediss", "unix") or (parsed.scheme != "unix" and not parsed.hostname):
            raise SettingsError(
                f"NUMPROTECT_REDIS_URL={shown!r}: must be redis://host:port/db, rediss://... or unix:///path"
            )
        for name, _ in parse_qsl(parsed.query, keep_blank_values=True):
            if _REDIS_URL_QUERY_REFUSED.match(name):
                raise SettingsError(
                    f"NUMPROTECT_REDIS_URL={_without_query(shown)!r}: option {name!r} is not taken from the URL "
                    "(TLS and credentials have their own NUMPROTECT_REDIS_* settings)"
                )
        mode = env.choice("NUMPROTECT_REDIS_MODE", "standalone", ("standalone", "cluster"))
        if mode == "cluster" and parsed.path not in ("", "/", "/0"):
            raise SettingsError(f"NUMPROTECT_REDIS_URL={shown!r}: Redis Cluster has only database 0")
        username, password = _redis_credentials(env, parsed.username, parsed.password)
        timeout_seconds = env.seconds("NUMPROTECT_REDIS_TIMEOUT", 2.0, minimum=0.01, maximum=60)
        wait_replicas = env.integer("NUMPROTECT_REDIS_WAIT_REPLICAS", 0, minimum=0, maximum=16)
        wait_timeout = env.seconds("NUMPROTECT_REDIS_WAIT_TIMEOUT", 0.5, minimum=0.001, maximum=60)
        client = env.choice("NUMPROTECT_REDIS_CLIENT", "mux", ("mux", "redis-py"))
        if wait_replicas and wait_timeout >= timeout_seconds:
            # WAIT holds the connection for up to its timeout: the socket timeout would cut it off first.
            raise SettingsError(
                f"NUMPROTECT_REDIS_WAIT_TIMEOUT={wait_timeout:g}s: must be shorter than "
                f"NUMPROTECT_REDIS_TIMEOUT ({timeout_seconds:g}s) when NUMPROTECT_REDIS_WAIT_REPLICAS is set"
            )
        return cls(
            url=shown,
            mode="cluster" if mode == "cluster" else "standalone",
            timeout_seconds=timeout_seconds,
            max_connections=env.integer("NUMPROTECT_REDIS_MAX_CONNECTIONS", 64, minimum=1, maximum=10_000),
            username=username,
            password=password,
            tls=RedisTls.from_env(env, parsed.scheme),
            wait_replicas=wait_replicas,
            wait_timeout_seconds=wait_timeout,
            client="redis-py" if client == "redis-py" else "mux",
        )


def _without_password(url: str) -> str:
    """`url` with the password of its user part removed (the user name stays)."""
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    user = f"{parsed.username}@" if parsed.username else ""
    host = parsed.netloc.rpartition("@")[2]
    return parsed._replace(netloc=user + host).geturl()


def _without_query(url: str) -> str:
    return urlparse(url)._replace(query="").geturl()


def _redis_credentials(env: Env, url_user: str | None, url_password: str | None) -> tuple[str | None, str | None]:
    """The ACL user and password: NUMPROTECT_REDIS_USERNAME and NUMPROTECT_REDIS_PASSWORD_FILE, or the URL's.

    A password is read from a file only (a Kubernetes Secret volume, `make run`'s .run/dev/), never from a
    variable: environments leak into process listings, crash reports and `kubectl describe`.
    """
    if env.raw("NUMPROTECT_REDIS_PASSWORD") is not None:
        raise SettingsError(
            "NUMPROTECT_REDIS_PASSWORD is not read: put the password in a file named by NUMPROTECT_REDIS_PASSWORD_FILE"
        )
    username = env.raw("NUMPROTECT_REDIS_USERNAME")
    user_in_url = unquote(url_user) if url_user else None
    if username is not None and user_in_url is not None and username != user_in_url:
        raise SettingsError("NUMPROTECT_REDIS_USERNAME differs from the user in NUMPROTECT_REDIS_URL: set one")
    username = username or user_in_url
    path = env.raw("NUMPROTECT_REDIS_PASSWORD_FILE")
    if path is not None and url_password is not None:
        raise SettingsError("NUMPROTECT_REDIS_PASSWORD_FILE and a password in NUMPROTECT_REDIS_URL: set one")
    if path is None:
        password = unquote(url_password) if url_password is not None else None
    else:
        try:
            password = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise SettingsError(f"NUMPROTECT_REDIS_PASSWORD_FILE={path!r}: cannot be read ({reason})") from None
        if not password:
            raise SettingsError(f"NUMPROTECT_REDIS_PASSWORD_FILE={path!r}: the file is empty")
    if username is not None and password is None:
        raise SettingsError("NUMPROTECT_REDIS_USERNAME needs NUMPROTECT_REDIS_PASSWORD_FILE (the user's password)")
    return username, password


@dataclass(frozen=True)
class ServerSettings:
    service: str
    host: str
    port: int
    # Seconds in-flight calls get to finish after SIGTERM before they are cancelled.
    grace_seconds: float
    # How often health re-checks Redis.
    health_interval_seconds: float
    # Several processes share the port on purpose (one per core); off by default so a stale server fails loudly.
    reuse_port: bool
    # Linux scheduling policy of every thread: "batch" (SCHED_BATCH, fewer GIL hand-off switches) or "normal".
    cpu_scheduling: str
    # Tracked allocations between young collections once start-up is over (Python's default is 700).
    gc_gen0_threshold: int
    # A second, plaintext port serving only grpc.health.v1 (Kubernetes' gRPC probe speaks no TLS); 0 = none.
    health_port: int = 0
    # Limits a hostile client meets at the transport (docs/security.md "Limits"): the largest request message,
    # concurrent calls (HTTP/2 streams) on one connection, and how long a connection lives before the server
    # asks the client to reconnect (rebalances load, bounds what one connection can hold on to).
    max_receive_message_bytes: int = 4 * 1024 * 1024
    max_concurrent_streams: int = 256
    max_connection_age_seconds: float = 1800.0
    # Server reflection (grpcurl without proto files), for authenticated callers only; off hides the contracts.
    reflection: bool = True
    # Load shedding in the call layer (limits.AioAdmission, limits.PoolAdmission; docs/operations.md "Overload"):
    # calls served at once (grpc.aio; the thread-pool server's bound is its worker count), calls waiting for a
    # place beyond them, and how long one may wait. Past them a call is answered RESOURCE_EXHAUSTED at once.
    max_inflight_calls: int = 256
    max_queued_calls: int = 512
    max_queue_wait_seconds: float = 0.5
    # Prometheus exposition (docs/operations.md "Metrics"): plaintext HTTP /metrics on its own port, 0 = one the OS
    # chooses (logged). The host defaults to the gRPC host: loopback unless the operator opened the service to the
    # network (Kubernetes: 0.0.0.0, NetworkPolicy admits the scrapers). Off: no registry content, no port, no cost.
    metrics: bool = True
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0

    @classmethod
    def from_env(cls, env: Env, service: str) -> ServerSettings:
        prefix = server_env_prefix(service)
        host = env.text(f"{prefix}_HOST", env.text("NUMPROTECT_HOST", "127.0.0.1"))
        metrics = env.choice("NUMPROTECT_METRICS", "on", ("on", "off")) == "on"
        return cls(
            service=service,
            host=host,
            port=env.integer(f"{prefix}_PORT", DEFAULT_PORTS[service], minimum=0, maximum=65535),
            grace_seconds=env.seconds("NUMPROTECT_GRACE_PERIOD", 10.0, minimum=0, maximum=600),
            health_interval_seconds=env.seconds("NUMPROTECT_HEALTH_INTERVAL", 1.0, minimum=0.05, maximum=60),
            reuse_port=env.flag(f"{prefix}_REUSE_PORT", False),
            cpu_scheduling=env.choice("NUMPROTECT_CPU_SCHEDULING", "batch", POLICIES),
            gc_gen0_threshold=env.integer(
                "NUMPROTECT_GC_GEN0_THRESHOLD", DEFAULT_GEN0_THRESHOLD, minimum=100, maximum=10_000_000
            ),
            health_port=env.integer("NUMPROTECT_HEALTH_PORT", 0, minimum=0, maximum=65535),
            max_receive_message_bytes=env.integer(
                "NUMPROTECT_MAX_RECEIVE_MESSAGE_BYTES", 4 * 1024 * 1024, minimum=1024, maximum=64 * 1024 * 1024
            ),
            max_concurrent_streams=env.integer("NUMPROTECT_MAX_CONCURRENT_STREAMS", 256, minimum=1, maximum=100_000),
            max_connection_age_seconds=env.seconds("NUMPROTECT_MAX_CONNECTION_AGE", 1800.0, minimum=1, maximum=86_400),
            reflection=env.flag("NUMPROTECT_REFLECTION", True),
            max_inflight_calls=env.integer("NUMPROTECT_MAX_INFLIGHT_CALLS", 256, minimum=1, maximum=100_000),
            max_queued_calls=env.integer("NUMPROTECT_MAX_QUEUED_CALLS", 512, minimum=0, maximum=1_000_000),
            max_queue_wait_seconds=env.seconds("NUMPROTECT_MAX_QUEUE_WAIT", 0.5, minimum=0, maximum=60),
            metrics=metrics,
            metrics_host=_metrics_host(env, host),
            metrics_port=env.integer("NUMPROTECT_METRICS_PORT", 0, minimum=0, maximum=65535),
        )


def _metrics_host(env: Env, default: str) -> str:
    """NUMPROTECT_METRICS_HOST: an address to bind (no port, no scheme); default the gRPC host."""
    raw = env.text("NUMPROTECT_METRICS_HOST", default)
    if not re.fullmatch(r"[A-Za-z0-9.:%_-]+", raw) or raw.count(":") == 1:
        raise SettingsError(
            f"NUMPROTECT_METRICS_HOST={raw!r}: must be a host name or address to listen on, without a port"
        )
    return raw


def server_env_prefix(service: str) -> str:
    """The prefix of a service's gRPC server variables: NUMPROTECT_BINDING for NUMPROTECT_BINDING_PORT, ..."""
    return _SERVER_ENV_PREFIXES.get(service, f"NUMPROTECT_{service.upper()}")


def server_port_variable(service: str) -> str:
    """The variable of a service's gRPC port: NUMPROTECT_<SERVICE>_PORT (sip: NUMPROTECT_SIP_GRPC_PORT)."""
    return f"{server_env_prefix(service)}_PORT"


def service_address(env: Env, service: str) -> str:
    """Where this process finds another service: NUMPROTECT_<SERVICE>_ADDR, default localhost and its port."""
    return env.address(f"NUMPROTECT_{service.upper()}_ADDR", f"127.0.0.1:{DEFAULT_PORTS[service]}")
