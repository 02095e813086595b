"""The SIP adapter's settings (NUMPROTECT_SIP_*), validated in build() before anything listens.

Each field is named after its variable (NUMPROTECT_SIP_<NAME>, lower case); durations are seconds.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from numprotect.core.settings import Env, SettingsError

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

TRANSPORTS = ("udp", "tcp")
NUMBER_FORMATS = ("national", "e164")
_PREFIX = "NUMPROTECT_SIP_"


def _transports(env: Env) -> tuple[str, ...]:
    name = f"{_PREFIX}TRANSPORTS"
    raw = env.text(name, "udp,tcp")
    chosen = tuple(dict.fromkeys(part.strip().lower() for part in raw.split(",") if part.strip()))
    if not chosen or any(part not in TRANSPORTS for part in chosen):
        raise SettingsError(f"{name}={raw!r}: must be a non-empty comma list of udp, tcp")
    return chosen


def _host(env: Env) -> str:
    name = f"{_PREFIX}HOST"
    raw = env.text(name, "127.0.0.1")
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: must be an IP address to bind (0.0.0.0 for every interface)") from None


def _egress(env: Env) -> str:
    name = f"{_PREFIX}EGRESS"
    raw = env.raw(name)
    if raw is None:
        raise SettingsError(f"{name} is required: host[:port] the 302's Contact sends calls to")
    host, sep, port = raw.rpartition(":") if not raw.endswith("]") else (raw, "", "")
    if not sep:
        host, port = raw, ""
    host_ok = bool(host) and all(ch.isalnum() or ch in "-.[]:" for ch in host) and host.isascii()
    port_ok = port == "" or (port.isdigit() and port.isascii() and 0 < int(port) < 65536)
    if not host_ok or not port_ok:
        raise SettingsError(f"{name}={raw!r}: must be host[:port] (a host name or IP, a port from 1 to 65535)")
    return raw


def _networks(env: Env) -> tuple[IpNetwork, ...]:
    name = f"{_PREFIX}ALLOWED_NETWORKS"
    raw = env.text(name, "127.0.0.0/8,::1/128")
    try:
        networks = tuple(ipaddress.ip_network(part.strip(), strict=False) for part in raw.split(",") if part.strip())
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: must be a comma list of CIDR networks (e.g. 10.0.0.0/8)") from None
    if not networks:
        raise SettingsError(f"{name}={raw!r}: must name at least one network")
    return networks


@dataclass(frozen=True, slots=True)
class SipSettings:
    host: str
    # 0: a port the OS chooses (tests); the bound one is logged.
    port: int
    transports: tuple[str, ...]
    # host[:port] in the 302's Contact and P-Asserted-Identity.
    egress: str
    # Requests from elsewhere are dropped (UDP) or their connection closed (TCP).
    allowed_networks: tuple[IpNetwork, ...]
    # The deadline of one translation (seconds); past it the INVITE gets 503.
    translate_timeout: float
    # The 503's Retry-After (whole seconds).
    retry_after: int
    # Long-lived TranslateStreams, and calls per stream message.
    streams: int
    batch_max: int
    # Server transactions held; beyond, a new INVITE gets 503 (overload).
    max_transactions: int
    # A larger message: UDP dropped, TCP 513 then close.
    max_message_bytes: int
    max_connections: int
    tcp_idle_timeout: float
    # "national" (13800138000) or "e164" (+8613800138000) in Contact and P-Asserted-Identity users.
    number_format: str

    @classmethod
    def from_env(cls, env: Env | Mapping[str, str]) -> SipSettings:
        env = env if isinstance(env, Env) else Env(env)
        return cls(
            host=_host(env),
            port=env.integer(f"{_PREFIX}PORT", 5060, minimum=0, maximum=65535),
            transports=_transports(env),
            egress=_egress(env),
            allowed_networks=_networks(env),
            translate_timeout=env.seconds(f"{_PREFIX}TRANSLATE_TIMEOUT", 0.2, minimum=0.01, maximum=5.0),
            retry_after=_whole_seconds(env, f"{_PREFIX}RETRY_AFTER"),
            streams=env.integer(f"{_PREFIX}STREAMS", 2, minimum=1, maximum=16),
            batch_max=env.integer(f"{_PREFIX}BATCH_MAX", 64, minimum=1, maximum=1000),
            max_transactions=env.integer(f"{_PREFIX}MAX_TRANSACTIONS", 100_000, minimum=1, maximum=10_000_000),
            max_message_bytes=env.integer(f"{_PREFIX}MAX_MESSAGE_BYTES", 16384, minimum=512, maximum=65535),
            max_connections=env.integer(f"{_PREFIX}MAX_CONNECTIONS", 1024, minimum=1, maximum=1_000_000),
            tcp_idle_timeout=env.seconds(f"{_PREFIX}TCP_IDLE_TIMEOUT", 300.0, minimum=1.0, maximum=86_400.0),
            number_format=env.choice(f"{_PREFIX}NUMBER_FORMAT", "national", NUMBER_FORMATS),
        )


def _whole_seconds(env: Env, name: str) -> int:
    """A duration with a unit (5s, 1m) that must be whole seconds from 1 to 3600."""
    seconds = env.seconds(name, 5.0, minimum=1.0, maximum=3600.0)
    if seconds != int(seconds):
        raise SettingsError(f"{name}={env.raw(name)!r}: must be whole seconds from 1 to 3600")
    return int(seconds)
