"""API keys and the audit trail: what AdminService does (the servicer, admin_servicer.py, validates and converts).

Keys live in one Redis hash under {auth} (numprotect.core.identity.api_keys); every process reloads its copy
after a change, so a revoked key is refused everywhere within NUMPROTECT_AUTH_REFRESH_SECONDS plus one reload.
Audit events are a Redis stream (numprotect.core.identity.audit) read newest first with XREVRANGE; each page scans
a bounded number of entries, so a filter that matches nothing costs at most that much per call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from numprotect.core.clock import Clock
from numprotect.core.errors import FailedPrecondition, NotFound
from numprotect.core.identity import api_keys, audit
from numprotect.core.identity.api_keys import ApiKeyRecord, HashKey
from numprotect.core.identity.audit import AuditEvent, ChainReport
from numprotect.core.identity.principal import Role
from numprotect.core.redis_client import RedisClient, SyncRedisClient

log = logging.getLogger(__name__)

# Audit entries one ListAuditEvents page reads at most (a page may come back short, with a token to go on).
AUDIT_SCAN_LIMIT = 10_000
_AUDIT_BATCH = 500
# An event's stream id is taken when the writer thread appends it, shortly after the call it records: a time
# range's upper end is searched this much further so no event of the range is missed (events are then filtered
# on their own time).
_APPEND_DELAY_MS = 60_000
_KEY_SEPARATOR = "/key:"


def principal_base(subject: str) -> str:
    """A principal's subject without its key: "tenant:acme/key:0123..." -> "tenant:acme"."""
    return subject.partition(_KEY_SEPARATOR)[0]


@dataclass(frozen=True)
class KeyFilter:
    role: Role | None = None
    tenant_id: str = ""
    carrier_id: str = ""
    show_revoked: bool = False

    def matches(self, record: ApiKeyRecord, now_ms: int) -> bool:
        principal = record.principal
        return (
            (self.role is None or principal.role is self.role)
            and (not self.tenant_id or principal.tenant_id == self.tenant_id)
            and (not self.carrier_id or principal.carrier_id == self.carrier_id)
            and (self.show_revoked or record.revoke_ms == 0)
        )


@dataclass(frozen=True)
class EventFilter:
    principal: str = ""  # an exact subject, or its part before "/key:" (every key of that principal)
    method: str = ""
    start_ms: int | None = None  # inclusive
    end_ms: int | None = None  # exclusive

    def matches(self, event: AuditEvent) -> bool:
        if self.principal and self.principal not in (event.principal, principal_base(event.principal)):
            return False
        if self.method and event.method != self.method:
            return False
        if self.start_ms is not None and event.time_ms < self.start_ms:
            return False
        return self.end_ms is None or event.time_ms < self.end_ms


class ApiKeys:
    """Minting, revoking and listing keys. `hash_key` is None when the process runs without an auth key
    (NUMPROTECT_AUTH=off and no key file): then no key can be minted."""

    def __init__(self, redis: RedisClient, hash_key: HashKey | None, clock: Clock) -> None:
        self.redis = redis
        self.hash_key = hash_key
        self.clock = clock

    async def create(
        self, role: Role, principal_id: str, *, description: str, expire_ms: int, created_by: str
    ) -> tuple[ApiKeyRecord, str]:
        """The new key's record and its token (returned to the caller once, never stored or logged)."""
        if self.hash_key is None:
            raise FailedPrecondition(
                "API keys need the auth key: set NUMPROTECT_AUTH_KEY_FILE", type_="AUTH_KEY", subject="api_keys"
            )
        record, token = api_keys.new_key(
            self.hash_key,
            role,
            principal_id,
            description=description,
            created_by=created_by,
            now_ms=self.clock.now_ms(),
            expire_ms=expire_ms,
        )
        await api_keys.store(self.redis, record)
        log.info("api key created", extra={"key_id": record.key_id, "role": role.value, "created_by": created_by})
        return record, token

    async def revoke(self, key_id: str) -> ApiKeyRecord:
        """The key as revoked (idempotent: an already revoked key keeps its first revoke time)."""
        record = await api_keys.load(self.redis, key_id)
        if record is None:
            raise NotFound(f"API key {key_id} not found", resource_type="api_key", resource_name=key_id)
        if record.revoke_ms:
            return record
        revoked = record.revoked(self.clock.now_ms())
        await api_keys.store(self.redis, revoked)
        log.info("api key revoked", extra={"key_id": key_id})
        return revoked

    async def list(
        self, key_filter: KeyFilter, page_size: int, after: tuple[int, str] | None
    ) -> tuple[list[ApiKeyRecord], tuple[int, str] | None]:
        """Keys newest first (create time, then key id), from after `after`; and where the next page starts."""
        now_ms = self.clock.now_ms()
        records = [r for r in reversed(await api_keys.load_all(self.redis)) if key_filter.matches(r, now_ms)]
        if after is not None:
            records = [r for r in records if (r.create_ms, r.key_id) < after]
        page = records[:page_size]
        following = (page[-1].create_ms, page[-1].key_id) if len(records) > page_size else None
        return page, following


class AuditTrail:
    """Reading and verifying the audit stream. Verifying walks the whole chain on a blocking client in a
    worker thread (HMAC per event: CPU the event loop must not spend), one walk at a time."""

    def __init__(
        self, redis: RedisClient, sync_redis: SyncRedisClient, audit_key: HashKey | None, *, scan_limit: int
    ) -> None:
        self.redis = redis
        self.sync_redis = sync_redis
        self.audit_key = audit_key
        self.scan_limit = scan_limit
        self._verifying = asyncio.Lock()

    async def events(
        self, event_filter: EventFilter, page_size: int, before: str | None
    ) -> tuple[list[tuple[str, AuditEvent]], str | None]:
        """Matching events newest first, strictly older than stream id `before`; and the id the next page
        continues before (None at the end). Reads at most `scan_limit` entries."""
        if before is not None:
            upper = f"({before}"
        elif event_filter.end_ms is not None:
            upper = str(event_filter.end_ms + _APPEND_DELAY_MS)
        else:
            upper = "+"
        # An event is appended after its call: its id is never older than its time.
        lower = str(event_filter.start_ms) if event_filter.start_ms is not None else "-"
        found: list[tuple[str, AuditEvent]] = []
        scanned = 0
        last = ""
        while scanned < self.scan_limit:
            batch = min(_AUDIT_BATCH, self.scan_limit - scanned)
            rows: Sequence[Any] = await self.redis.xrevrange(audit.LOG_KEY, max=upper, min=lower, count=batch) or []
            for entry_id, fields in rows:
                scanned += 1
                last = _text(entry_id)
                event = _decode(last, fields)
                if event is not None and event_filter.matches(event):
                    found.append((last, event))
                    if len(found) == page_size:
                        return found, last
            if len(rows) < batch:
                return found, None
            upper = f"({last}"
        return found, last

    async def verify(self) -> ChainReport:
        if self.audit_key is None:
            raise FailedPrecondition(
                "the audit chain needs the auth key: set NUMPROTECT_AUTH_KEY_FILE", type_="AUTH_KEY", subject="audit"
            )
        key = self.audit_key
        async with self._verifying:
            return await asyncio.to_thread(audit.verify_redis, key, self.sync_redis)


def _decode(entry_id: str, fields: Any) -> AuditEvent | None:
    raw = fields.get(b"e", fields.get("e")) if isinstance(fields, dict) else None
    try:
        return AuditEvent.from_canonical(raw) if raw is not None else None
    except (ValueError, TypeError):
        # An edited event that no longer parses: VerifyAuditChain names it; the listing goes on without it.
        log.warning("audit event unreadable", extra={"event_id": entry_id})
        return None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
