"""A tenant's webhook endpoints, in its hash `TenantKeys.endpoints` (endpoint id -> stored Endpoint bytes), the
tenant in `TENANTS_KEY` (what dispatchers poll).

Stored form: the `Endpoint` message with its secrets in `secret`: the current one, then, while a rotation's grace
runs, a space and the previous one (a secret is "whsec_" + base64, never a space), until
`previous_secret_expire_time`. Answers never carry the stored `secret`: only CreateEndpoint and RotateEndpointSecret
set it, to the new current secret. Changes are read, change, swap (endpoint_swap.lua): a concurrent change makes
the loser read again, so two updates never lose one another.
"""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from numprotect.core.clock import Clock
from numprotect.core.conversions import timestamp_from_ms
from numprotect.core.errors import Aborted, ResourceExhausted
from numprotect.core.event_keys import TENANTS_KEY, TenantKeys
from numprotect.core.identifiers import IdentifierRule
from numprotect.core.redis_client import LuaScript, RedisClient, as_text
from numprotect.events.v1 import events_pb2
from numprotect.services.events.settings import EventsSettings

ENDPOINT_ID = IdentifierRule(
    re.compile(r"ep_[a-z2-7]{26}", re.ASCII),
    "must be an endpoint id as CreateEndpoint answers it (ep_ and 26 characters)",
)
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 24
MAX_ENDPOINTS_SETTING = "NUMPROTECT_EVENTS_MAX_ENDPOINTS_PER_TENANT"
# Read, change, swap: how often a change is tried against concurrent ones before ABORTED.
_SWAP_TRIES = 8

ENABLED = events_pb2.ENDPOINT_STATE_ENABLED
DISABLED = events_pb2.ENDPOINT_STATE_DISABLED
GONE = events_pb2.ENDPOINT_STATE_GONE


def new_endpoint_id() -> str:
    """A new endpoint id: "ep_" + 26 lowercase base32 characters (130 random bits)."""
    return "ep_" + base64.b32encode(secrets.token_bytes(20)).decode()[:26].lower()


def new_secret() -> str:
    """A Standard Webhooks signing secret: "whsec_" + base64 of 24 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


@dataclass(frozen=True)
class StoredEndpoint:
    """An endpoint as stored: `endpoint` without its secrets (never modify it: `public()` gives a copy to answer
    with), the current secret, and the previous one with the end of its grace (ms; "" and 0 when none)."""

    endpoint: events_pb2.Endpoint
    # Never in a repr (a log line, an error, a test's failure message): a secret signs the tenant's webhooks.
    secret: str = field(repr=False)
    previous_secret: str = field(default="", repr=False)
    previous_secret_expire_ms: int = 0

    @property
    def tenant_id(self) -> str:
        return self.endpoint.tenant_id

    @property
    def endpoint_id(self) -> str:
        return self.endpoint.endpoint_id

    @property
    def url(self) -> str:
        return self.endpoint.url

    @property
    def enabled(self) -> bool:
        return self.endpoint.state == ENABLED

    @property
    def batch_size(self) -> int:
        """Most events in one request (at least 1)."""
        return max(1, self.endpoint.batch_size)

    def concurrency(self, default: int) -> int:
        """Most requests in flight to this endpoint (`default`: the service's, when the endpoint names none)."""
        return self.endpoint.max_concurrency or default

    def subscribes(self, event_type: str) -> bool:
        return not self.endpoint.event_types or event_type in self.endpoint.event_types

    def signing_secrets(self, now_ms: int) -> list[str]:
        """The secrets that sign a request sent at `now_ms`: the current one first, then the previous one while its
        grace runs."""
        if self.previous_secret and now_ms < self.previous_secret_expire_ms:
            return [self.secret, self.previous_secret]
        return [self.secret]

    def public(self, now_ms: int, *, with_secret: bool = False) -> events_pb2.Endpoint:
        """The endpoint as answered: a copy, the current secret only `with_secret` (Create, Rotate), the previous
        secret's end only while its grace runs."""
        answer = events_pb2.Endpoint()
        answer.CopyFrom(self.endpoint)
        if with_secret:
            answer.secret = self.secret
        if self.previous_secret and now_ms < self.previous_secret_expire_ms:
            answer.previous_secret_expire_time.CopyFrom(timestamp_from_ms(self.previous_secret_expire_ms))
        return answer

    def to_bytes(self) -> bytes:
        stored = events_pb2.Endpoint()
        stored.CopyFrom(self.endpoint)
        stored.secret = f"{self.secret} {self.previous_secret}" if self.previous_secret else self.secret
        if self.previous_secret:
            stored.previous_secret_expire_time.CopyFrom(timestamp_from_ms(self.previous_secret_expire_ms))
        return stored.SerializeToString(deterministic=True)

    @classmethod
    def from_bytes(cls, raw: bytes) -> StoredEndpoint:
        stored = events_pb2.Endpoint.FromString(raw)
        current, _, previous = stored.secret.partition(" ")
        expire_ms = stored.previous_secret_expire_time.ToMilliseconds() if previous else 0
        stored.ClearField("secret")
        stored.ClearField("previous_secret_expire_time")
        return cls(stored, current, previous, expire_ms)

    def changed(
        self,
        change: Callable[[events_pb2.Endpoint], None],
        now_ms: int,
        *,
        secret: str | None = None,
        previous_secret: str = "",
        previous_secret_expire_ms: int = 0,
    ) -> StoredEndpoint:
        """A copy with `change` applied to its endpoint and update_time now, and new secrets when given (else the
        same ones; a previous secret whose grace has ended is dropped)."""
        endpoint = events_pb2.Endpoint()
        endpoint.CopyFrom(self.endpoint)
        change(endpoint)
        endpoint.update_time.CopyFrom(timestamp_from_ms(now_ms))
        if secret is not None:
            return StoredEndpoint(endpoint, secret, previous_secret, previous_secret_expire_ms)
        if now_ms >= self.previous_secret_expire_ms:
            return StoredEndpoint(endpoint, self.secret)
        return StoredEndpoint(endpoint, self.secret, self.previous_secret, self.previous_secret_expire_ms)


@dataclass(frozen=True)
class EndpointSpec:
    """What CreateEndpoint stores (validated: validation.create_spec)."""

    tenant_id: str
    url: str
    event_types: tuple[str, ...]
    description: str
    batch_size: int
    max_concurrency: int


# A change of one stored endpoint: the new one, or None to leave it as it is; and whether deliveries resume now
# (the endpoint is enabled again or points at a new URL).
Change = Callable[[StoredEndpoint], "tuple[StoredEndpoint, bool] | None"]


class EndpointStore:
    """Every tenant's endpoints (one hash per tenant, in the tenant's slot) and the set of tenants that have some."""

    _create = LuaScript.beside(__file__, "endpoint_create.lua")
    _swap = LuaScript.beside(__file__, "endpoint_swap.lua")
    _delete = LuaScript.beside(__file__, "endpoint_delete.lua")

    def __init__(self, redis: RedisClient, settings: EventsSettings, clock: Clock) -> None:
        self.redis = redis
        self.settings = settings
        self.clock = clock

    # --- what the router and the dispatcher read --------------------------------------------------

    async def tenants(self) -> list[str]:
        """Tenants that have (or had) endpoints."""
        members = await self.redis.smembers(TENANTS_KEY)  # type: ignore[misc]
        return sorted(as_text(m) for m in members)

    async def stored(self, tenant_id: str) -> list[StoredEndpoint]:
        """All of a tenant's endpoints, oldest first."""
        raw: dict[Any, Any] = await self.redis.hgetall(TenantKeys(tenant_id).endpoints)  # type: ignore[misc]
        endpoints = [StoredEndpoint.from_bytes(value) for value in raw.values()]
        endpoints.sort(key=_order)
        return endpoints

    async def get_stored(self, tenant_id: str, endpoint_id: str) -> StoredEndpoint | None:
        raw: Any = await self.redis.hget(TenantKeys(tenant_id).endpoints, endpoint_id)  # type: ignore[misc]
        return None if raw is None else StoredEndpoint.from_bytes(raw)

    async def mark_gone(self, tenant_id: str, endpoint_id: str, reason: str, *, url: str | None = None) -> None:
        """The receiver answered 410 Gone: the endpoint receives nothing until UpdateEndpoint enables it again. An
        endpoint already disabled (or deleted) stays as it is; so does one that no longer points at `url` (the URL
        the 410 came from, when given): a tenant that moved its endpoint to a new receiver and retired the old one
        with 410s must not have the new one disabled by an answer to a request sent before the move."""

        def gone(stored: StoredEndpoint) -> tuple[StoredEndpoint, bool] | None:
            if stored.endpoint.state != ENABLED or (url is not None and stored.url != url):
                return None

            def change(endpoint: events_pb2.Endpoint) -> None:
                endpoint.state = GONE
                endpoint.state_reason = reason[:256]

            return stored.changed(change, self.clock.now_ms()), False

        await self.change(tenant_id, endpoint_id, gone)

    # --- the API's --------------------------------------------------------------------------------

    async def create(self, spec: EndpointSpec) -> StoredEndpoint:
        """Stores a new enabled endpoint with a new secret; RESOURCE_EXHAUSTED when the tenant has the most it may."""
        keys = TenantKeys(spec.tenant_id)
        # The tenant first: a dispatcher that polls tenants never misses one with an endpoint (a tenant without
        # endpoints in the set costs a poll, nothing else).
        await self.redis.sadd(TENANTS_KEY, spec.tenant_id)  # type: ignore[misc]
        while True:
            now = timestamp_from_ms(self.clock.now_ms())
            endpoint = events_pb2.Endpoint(
                tenant_id=spec.tenant_id,
                endpoint_id=new_endpoint_id(),
                url=spec.url,
                event_types=spec.event_types,
                description=spec.description,
                state=ENABLED,
                batch_size=spec.batch_size,
                max_concurrency=spec.max_concurrency,
                create_time=now,
                update_time=now,
            )
            stored = StoredEndpoint(endpoint, new_secret())
            outcome = await self._create(
                self.redis,
                [keys.endpoints],
                [endpoint.endpoint_id, stored.to_bytes(), self.settings.max_endpoints_per_tenant],
            )
            if outcome == 1:
                return stored
            if outcome == 0:
                limit = self.settings.max_endpoints_per_tenant
                raise ResourceExhausted(
                    f"tenant {spec.tenant_id} has {limit} endpoints, the most {MAX_ENDPOINTS_SETTING} allows; "
                    "delete one first",
                    subject=MAX_ENDPOINTS_SETTING,
                )
            # -1: a 130-bit id drawn twice; draw again.

    async def change(self, tenant_id: str, endpoint_id: str, change: Change) -> StoredEndpoint | None:
        """Applies `change` to the endpoint as stored now (read, change, swap; again when a concurrent change
        won). The endpoint after it, or None when there is no such endpoint."""
        keys = TenantKeys(tenant_id)
        for _ in range(_SWAP_TRIES):
            raw: Any = await self.redis.hget(keys.endpoints, endpoint_id)  # type: ignore[misc]
            if raw is None:
                return None
            stored = StoredEndpoint.from_bytes(raw)
            outcome = change(stored)
            if outcome is None:
                return stored
            new, resume = outcome
            swapped = await self._swap(
                self.redis,
                [keys.endpoints, keys.ready, keys.state(endpoint_id)],
                [endpoint_id, raw, new.to_bytes(), "1" if resume else "0", self.clock.now_ms()],
            )
            if swapped == 1:
                return new
            if swapped == -1:
                return None
        raise Aborted(f"endpoint {endpoint_id} kept changing under this call; try again")

    async def rotate(self, tenant_id: str, endpoint_id: str, grace_ms: int) -> StoredEndpoint | None:
        """A new current secret; the current one signs too for `grace_ms` more (0: it stops at once)."""
        secret = new_secret()

        def rotated(stored: StoredEndpoint) -> tuple[StoredEndpoint, bool]:
            now_ms = self.clock.now_ms()
            previous, until = (stored.secret, now_ms + grace_ms) if grace_ms > 0 else ("", 0)
            new = stored.changed(
                lambda _: None, now_ms, secret=secret, previous_secret=previous, previous_secret_expire_ms=until
            )
            return new, False

        return await self.change(tenant_id, endpoint_id, rotated)

    async def delete(self, tenant_id: str, endpoint_id: str) -> bool:
        """Removes the endpoint and every key of its deliveries; False when there was none."""
        keys = TenantKeys(tenant_id)
        removed = await self._delete(
            self.redis, [keys.endpoints, keys.ready, *keys.endpoint_keys(endpoint_id)], [endpoint_id]
        )
        return bool(removed)


def _order(stored: StoredEndpoint) -> tuple[int, str]:
    return stored.endpoint.create_time.ToMilliseconds(), stored.endpoint_id
