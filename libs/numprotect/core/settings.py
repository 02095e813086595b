"""Settings from the environment, validated once at start-up.

A bad value raises SettingsError whose message is one line naming the variable and the rule; the
bootstrap prints it and exits with status 2.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlparse

from numprotect.core.gc_tuning import DEFAULT_GEN0_THRESHOLD
from numprotect.core.scheduling import POLICIES

DEFAULT_PORTS: Mapping[str, int] = {"allocation": 50051, "binding": 50052, "translation": 50053, "cdr": 50054}
SERVICE_NAMES = tuple(DEFAULT_PORTS)

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


@dataclass(frozen=True)
class RedisSettings:
    url: str
    mode: Literal["standalone", "cluster"]
    # Per-command socket timeout: a slow Redis becomes UNAVAILABLE instead of a hung call.
    timeout_seconds: float
    max_connections: int

    @classmethod
    def from_env(cls, env: Env) -> RedisSettings:
        url = env.text("NUMPROTECT_REDIS_URL", "redis://127.0.0.1:6379/0")
        parsed = urlparse(url)
        if parsed.scheme not in ("redis", "rediss", "unix") or (parsed.scheme != "unix" and not parsed.hostname):
            raise SettingsError(
                f"NUMPROTECT_REDIS_URL={url!r}: must be redis://host:port/db, rediss://... or unix:///path"
            )
        mode = env.choice("NUMPROTECT_REDIS_MODE", "standalone", ("standalone", "cluster"))
        if mode == "cluster" and parsed.path not in ("", "/", "/0"):
            raise SettingsError(f"NUMPROTECT_REDIS_URL={url!r}: Redis Cluster has only database 0")
        return cls(
            url=url,
            mode="cluster" if mode == "cluster" else "standalone",
            timeout_seconds=env.seconds("NUMPROTECT_REDIS_TIMEOUT", 2.0, minimum=0.01, maximum=60),
            max_connections=env.integer("NUMPROTECT_REDIS_MAX_CONNECTIONS", 64, minimum=1, maximum=10_000),
        )


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

    @classmethod
    def from_env(cls, env: Env, service: str) -> ServerSettings:
        prefix = f"NUMPROTECT_{service.upper()}"
        return cls(
            service=service,
            host=env.text(f"{prefix}_HOST", env.text("NUMPROTECT_HOST", "127.0.0.1")),
            port=env.integer(f"{prefix}_PORT", DEFAULT_PORTS[service], minimum=0, maximum=65535),
            grace_seconds=env.seconds("NUMPROTECT_GRACE_PERIOD", 10.0, minimum=0, maximum=600),
            health_interval_seconds=env.seconds("NUMPROTECT_HEALTH_INTERVAL", 1.0, minimum=0.05, maximum=60),
            reuse_port=env.flag(f"{prefix}_REUSE_PORT", False),
            cpu_scheduling=env.choice("NUMPROTECT_CPU_SCHEDULING", "batch", POLICIES),
            gc_gen0_threshold=env.integer(
                "NUMPROTECT_GC_GEN0_THRESHOLD", DEFAULT_GEN0_THRESHOLD, minimum=100, maximum=10_000_000
            ),
        )


def service_address(env: Env, service: str) -> str:
    """Where this process finds another service: NUMPROTECT_<SERVICE>_ADDR, default localhost and its port."""
    return env.address(f"NUMPROTECT_{service.upper()}_ADDR", f"127.0.0.1:{DEFAULT_PORTS[service]}")
