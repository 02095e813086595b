"""The events service's settings (NUMPROTECT_EVENTS_*), validated in build() before the server starts."""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass

from numprotect.core.settings import Env, SettingsError

DAY_SECONDS = 86_400.0
# Standard Webhooks' own schedule after the first attempt: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h (~27.6 h).
DEFAULT_RETRY_SCHEDULE = "5s,5m,30m,2h,5h,10h,10h"

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class EventsSettings:
    # Delays before attempts 2, 3, ... (seconds); after the last, the event is a dead letter.
    retry_schedule: tuple[float, ...]
    # Each delay is drawn uniformly within +/- this fraction of itself.
    retry_jitter: float
    # Receivers on loopback, link-local, private and other non-global addresses are refused unless inside one of
    # these networks.
    allowed_networks: tuple[IpNetwork, ...]
    # http:// endpoint URLs (off: https only).
    allow_http: bool
    # One request: connect + send + the response headers and (up to max_response_bytes) body.
    request_timeout_s: float
    max_response_bytes: int
    # Requests in flight per endpoint when the endpoint names none; and the most one may name.
    endpoint_concurrency: int
    max_endpoint_concurrency: int
    # Most events one batched request may carry (an endpoint's batch_size).
    max_batch_size: int
    # How long events (the tenant log, WatchEvents, ReplayEvents) and delivery attempts are kept.
    retention_s: float
    # The previous secret's grace period after RotateEndpointSecret when the caller names none, and the longest.
    rotation_grace_s: float
    max_rotation_grace_s: float
    # Endpoints per tenant.
    max_endpoints_per_tenant: int
    # How often a process looks for work: outbox rings and endpoint queues (poll), binding expiries (expiry_poll),
    # and every slot's outbox whatever the rings say (sweep).
    poll_interval_s: float
    expiry_poll_s: float
    sweep_interval_s: float
    # WatchEvents: longest blocking XREAD, most watchers per process and per tenant per process.
    watch_block_s: float
    max_watchers: int
    max_watchers_per_tenant: int
    # Most events one ReplayEvents call may queue (a range holding more is refused: replay shorter ranges).
    max_replay_events: int
    # CAs trusted for receivers' certificates besides the system store (receivers with a private PKI); "": none.
    ca_file: str = ""

    def receiver_tls(self) -> ssl.SSLContext:
        """The TLS context of requests to receivers: the system trust store plus `ca_file`'s CAs, certificates and
        host names always checked, TLS 1.2 or later."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.ca_file:
            context.load_verify_locations(cafile=self.ca_file)
        return context

    @property
    def attempts(self) -> int:
        """Attempts per event before it is a dead letter: the first, then one per delay of the schedule."""
        return 1 + len(self.retry_schedule)

    @property
    def lease_s(self) -> float:
        """How long a claimed delivery stays with its dispatcher before another may take it (a dead dispatcher's
        work is taken over after this)."""
        return self.request_timeout_s + 5.0

    @classmethod
    def from_env(cls, env: Env) -> EventsSettings:
        schedule = _schedule(env.text("NUMPROTECT_EVENTS_RETRY_SCHEDULE", DEFAULT_RETRY_SCHEDULE))
        settings = cls(
            retry_schedule=schedule,
            retry_jitter=env.number("NUMPROTECT_EVENTS_RETRY_JITTER", 0.2, minimum=0.0, maximum=0.5),
            allowed_networks=_networks(env.raw("NUMPROTECT_EVENTS_ALLOWED_NETWORKS") or ""),
            allow_http=env.flag("NUMPROTECT_EVENTS_ALLOW_HTTP", False),
            request_timeout_s=env.seconds("NUMPROTECT_EVENTS_REQUEST_TIMEOUT", 10, minimum=0.1, maximum=120),
            max_response_bytes=env.integer("NUMPROTECT_EVENTS_MAX_RESPONSE_BYTES", 4096, minimum=0, maximum=1 << 20),
            endpoint_concurrency=env.integer("NUMPROTECT_EVENTS_ENDPOINT_CONCURRENCY", 4, minimum=1, maximum=1000),
            max_endpoint_concurrency=env.integer(
                "NUMPROTECT_EVENTS_MAX_ENDPOINT_CONCURRENCY", 64, minimum=1, maximum=1000
            ),
            max_batch_size=env.integer("NUMPROTECT_EVENTS_MAX_BATCH_SIZE", 100, minimum=1, maximum=1000),
            retention_s=env.seconds(
                "NUMPROTECT_EVENTS_RETENTION", 3 * DAY_SECONDS, minimum=1, maximum=30 * DAY_SECONDS
            ),
            rotation_grace_s=env.seconds(
                "NUMPROTECT_EVENTS_ROTATION_GRACE", DAY_SECONDS, minimum=0, maximum=7 * DAY_SECONDS
            ),
            max_rotation_grace_s=7 * DAY_SECONDS,
            max_endpoints_per_tenant=env.integer(
                "NUMPROTECT_EVENTS_MAX_ENDPOINTS_PER_TENANT", 50, minimum=1, maximum=10_000
            ),
            poll_interval_s=env.seconds("NUMPROTECT_EVENTS_POLL_INTERVAL", 0.2, minimum=0.01, maximum=60),
            expiry_poll_s=env.seconds("NUMPROTECT_EVENTS_EXPIRY_POLL", 1, minimum=0.05, maximum=60),
            sweep_interval_s=env.seconds("NUMPROTECT_EVENTS_SWEEP_INTERVAL", 30, minimum=1, maximum=3600),
            watch_block_s=env.seconds("NUMPROTECT_EVENTS_WATCH_BLOCK", 1, minimum=0.01, maximum=60),
            max_watchers=env.integer("NUMPROTECT_EVENTS_MAX_WATCHERS", 256, minimum=1, maximum=100_000),
            max_watchers_per_tenant=env.integer(
                "NUMPROTECT_EVENTS_MAX_WATCHERS_PER_TENANT", 8, minimum=1, maximum=100_000
            ),
            max_replay_events=env.integer(
                "NUMPROTECT_EVENTS_MAX_REPLAY_EVENTS", 100_000, minimum=1, maximum=10_000_000
            ),
            ca_file=env.raw("NUMPROTECT_EVENTS_CA_FILE") or "",
        )
        if settings.ca_file:
            try:
                settings.receiver_tls()  # a missing, unreadable or non-PEM file refuses start-up here
            except (OSError, ssl.SSLError, ValueError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
                raise SettingsError(
                    f"NUMPROTECT_EVENTS_CA_FILE={settings.ca_file!r}: cannot load CA certificates from it ({reason}); "
                    "it must be a readable PEM file of CA certificates"
                ) from None
        # Each delay may be drawn up to the jitter longer: the last attempt comes up to (1 + jitter) x the total
        # after the first, and its event must still be in the log then (else it is dropped, not a dead letter).
        longest_s = sum(schedule) * (1 + settings.retry_jitter)
        if settings.retention_s < longest_s + 3600:
            raise SettingsError(
                "NUMPROTECT_EVENTS_RETENTION: must be at least the retry schedule's total, lengthened by "
                f"NUMPROTECT_EVENTS_RETRY_JITTER, plus 1 h ({(longest_s + 3600) / 3600:.1f} h): an event waiting for "
                "its last attempt must still be kept"
            )
        if settings.endpoint_concurrency > settings.max_endpoint_concurrency:
            raise SettingsError(
                "NUMPROTECT_EVENTS_ENDPOINT_CONCURRENCY: must not exceed NUMPROTECT_EVENTS_MAX_ENDPOINT_CONCURRENCY"
            )
        return settings


def _schedule(raw: str) -> tuple[float, ...]:
    name = "NUMPROTECT_EVENTS_RETRY_SCHEDULE"
    parts = [part.strip() for part in raw.split(",")] if raw.strip() else []
    if not parts or len(parts) > 50:
        raise SettingsError(f"{name}={raw!r}: must be a comma list of 1 to 50 durations (such as 5s,5m,30m)")
    delays = []
    for part in parts:
        try:
            delays.append(Env({name: part}).seconds(name, 0, minimum=0.001, maximum=7 * DAY_SECONDS))
        except SettingsError:
            raise SettingsError(
                f"{name}={raw!r}: {part!r} is not a duration between 1ms and 7d (such as 500ms, 5s, 5m, 2h)"
            ) from None
    return tuple(delays)


def _networks(raw: str) -> tuple[IpNetwork, ...]:
    networks = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise SettingsError(
                f"NUMPROTECT_EVENTS_ALLOWED_NETWORKS: {part!r} is not a CIDR network (such as 127.0.0.0/8)"
            ) from None
    return tuple(networks)
