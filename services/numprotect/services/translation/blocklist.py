"""Blocklists of calling numbers (global and per tenant): stored in Redis, checked from an in-process copy.

The blocklists cannot live in the called number's hash slot, so the hot path never reads them from Redis.
Each process keeps a snapshot (`BlocklistView`) and polls one version counter every
NUMPROTECT_TRANSLATION_BLOCKLIST_REFRESH (default 1 s); when the counter moved it reloads every list. A
Block or Unblock therefore takes effect in every process within one refresh interval plus one reload.
Entries with a TTL lapse exactly at their expiry, in-process, without waiting for a refresh.

A stored entry that breaks the rules BlockCaller checks (written by an older version, or by hand: a field that is
not a number, a time no Timestamp can hold, a calling number that is not one) never fails a listing or a reload:
readers skip it with a warning, or bound its times to the Timestamp range, and the list's next BlockCaller removes
the unreadable ones.

    np:bl:version            string  counter, INCR after every change
    np:bl:scopes             set     scopes that have (or had) entries: "g" (global), "t:<tenant_id>"
    np:bl:{<scope>}          hash    calling number -> "<create_ms>|<expire_ms or 0>|<reason>"
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from numprotect.core.clock import Clock
from numprotect.core.conversions import TIMESTAMP_MAX_MS, in_timestamp_range
from numprotect.core.errors import ResourceExhausted
from numprotect.core.identifiers import TENANT_ID
from numprotect.core.phone import mask, normalize_calling
from numprotect.core.redis_client import SyncRedisClient, as_text

log = logging.getLogger(__name__)

VERSION_KEY = "np:bl:version"
SCOPES_KEY = "np:bl:scopes"
GLOBAL_SCOPE = "g"
MAX_ENTRIES_DEFAULT = 10_000  # live entries per list (NUMPROTECT_TRANSLATION_BLOCKLIST_MAX_ENTRIES)
# The longest ttl BlockCaller takes (longer: block without a ttl, which never lapses).
MAX_TTL_MS = 3650 * 86_400_000
# How long `BlocklistRefresher.stop` waits for a reload in progress (each command is bounded by the Redis timeout).
STOP_WAIT_SECONDS = 2.0


def scope_of(tenant_id: str) -> str:
    """The list a tenant id names: the global list for "", else the tenant's (INVALID_ARGUMENT on a bad id)."""
    if not tenant_id:
        return GLOBAL_SCOPE
    return "t:" + TENANT_ID.check("tenant_id", tenant_id)


def list_key(scope: str) -> str:
    return "np:bl:{" + scope + "}"


@dataclass(frozen=True, slots=True)
class StoredEntry:
    tenant_id: str
    calling_number: str
    reason: str
    create_ms: int
    # 0: never lapses.
    expire_ms: int

    def live(self, now_ms: int) -> bool:
        return self.expire_ms == 0 or self.expire_ms > now_ms

    def encode(self) -> str:
        return f"{self.create_ms}|{self.expire_ms}|{self.reason}"

    @classmethod
    def decode(cls, tenant_id: str, number: str, raw: str) -> StoredEntry:
        """The entry stored as `raw`; ValueError when it is unreadable. Times no Timestamp can hold are bounded to
        the range (an expiry past 9999-12-31 lapses then, a create time outside it reads as 0)."""
        if normalize_calling(number) != number:  # InvalidNumber is a ValueError
            raise ValueError("the calling number is not in its normalised form")
        create, expire, reason = raw.split("|", 2)
        create_ms, expire_ms = int(create), int(expire)
        if not in_timestamp_range(create_ms):
            create_ms = 0
        if expire_ms < 0:
            raise ValueError("negative expiry")
        return cls(tenant_id, number, reason, create_ms, min(expire_ms, TIMESTAMP_MAX_MS))


@dataclass(slots=True)
class CallerBlocks:
    """Everything that blocks one calling number: global entry expiry (None: none) and tenants' expiries."""

    global_expire_ms: int | None = None
    tenants: dict[str, int] = field(default_factory=dict)

    def blocked_globally(self, now_ms: int) -> bool:
        expire = self.global_expire_ms
        return expire is not None and (expire == 0 or expire > now_ms)

    def tenants_arg(self, now_ms: int) -> str:
        """The script argument naming the tenants that block this caller now: '|t1|t2|' or ''."""
        live = [t for t, expire in self.tenants.items() if expire == 0 or expire > now_ms]
        return "|" + "|".join(live) + "|" if live else ""


class BlocklistView:
    """The in-process copy the hot path reads: one dict lookup per call, replaced whole on reload."""

    def __init__(self) -> None:
        self._by_caller: Mapping[str, CallerBlocks] = {}
        self.version: int | None = None
        self.loaded_at = 0.0

    def lookup(self, caller: str) -> CallerBlocks | None:
        return self._by_caller.get(caller)

    def replace(self, entries: list[StoredEntry], version: int) -> None:
        by_caller: dict[str, CallerBlocks] = {}
        for entry in entries:
            blocks = by_caller.setdefault(entry.calling_number, CallerBlocks())
            if entry.tenant_id:
                blocks.tenants[entry.tenant_id] = entry.expire_ms
            else:
                blocks.global_expire_ms = entry.expire_ms
        self._by_caller = by_caller  # one reference swap: readers see the old or the new copy
        self.version = version
        self.loaded_at = time.monotonic()

    def __len__(self) -> int:
        return len(self._by_caller)


class BlocklistStore:
    """The blocklists in Redis: writes (Block/Unblock RPCs), listing, and loading into a BlocklistView."""

    def __init__(self, redis: SyncRedisClient, clock: Clock, *, max_entries: int = MAX_ENTRIES_DEFAULT) -> None:
        self.redis = redis
        self.clock = clock
        self.max_entries = max_entries  # NUMPROTECT_TRANSLATION_BLOCKLIST_MAX_ENTRIES

    def block(self, entry: StoredEntry) -> None:
        """Adds or replaces an entry; RESOURCE_EXHAUSTED when its list already holds `max_entries` live entries
        (every process keeps every list in memory: one tenant must not grow them all without bound). Two
        concurrent blocks may overshoot the bound by one each: it caps growth, not an exact count."""
        scope = scope_of(entry.tenant_id)
        key = list_key(scope)
        now_ms = self.clock.now_ms()
        stored, unreadable = self._read(scope, entry.tenant_id)
        lapsed: list[bytes | str] = [e.calling_number for e in stored if not e.live(now_ms)]
        lapsed += unreadable
        live = {e.calling_number for e in stored if e.live(now_ms)}
        max_entries = self.max_entries
        if entry.calling_number not in live and len(live) >= max_entries:
            raise ResourceExhausted(
                f"the blocklist holds {len(live)} entries, at most {max_entries} "
                "(NUMPROTECT_TRANSLATION_BLOCKLIST_MAX_ENTRIES): unblock some first",
                subject="NUMPROTECT_TRANSLATION_BLOCKLIST_MAX_ENTRIES",
            )
        if lapsed:
            self.redis.hdel(key, *lapsed)
        self.redis.hset(key, entry.calling_number, entry.encode())
        self.redis.sadd(SCOPES_KEY, scope)
        self.redis.incr(VERSION_KEY)  # after the entry: a reader that sees the new version sees the entry

    def unblock(self, tenant_id: str, calling_number: str) -> bool:
        removed = self.redis.hdel(list_key(scope_of(tenant_id)), calling_number)
        self.redis.incr(VERSION_KEY)
        return bool(removed)

    def entries(self, tenant_id: str) -> list[StoredEntry]:
        """The live entries of one list, sorted by calling number."""
        now_ms = self.clock.now_ms()
        found = [e for e in self._entries(scope_of(tenant_id), tenant_id) if e.live(now_ms)]
        return sorted(found, key=lambda e: e.calling_number)

    def _entries(self, scope: str, tenant_id: str) -> list[StoredEntry]:
        return self._read(scope, tenant_id)[0]

    def _read(self, scope: str, tenant_id: str) -> tuple[list[StoredEntry], list[bytes | str]]:
        """The readable entries of one list, and the fields of the unreadable ones (skipped with a warning)."""
        raw: dict[bytes, bytes] = self.redis.hgetall(list_key(scope))  # type: ignore[assignment]
        entries: list[StoredEntry] = []
        unreadable: list[bytes | str] = []
        for raw_number, raw_entry in raw.items():
            try:  # as_text raises UnicodeDecodeError, a ValueError, for bytes that are no UTF-8
                entries.append(StoredEntry.decode(tenant_id, as_text(raw_number), as_text(raw_entry)))
            except ValueError as exc:
                unreadable.append(raw_number)
                log.warning(
                    "blocklist entry unreadable, skipped",
                    extra={"scope": scope, "calling_number": mask(repr(raw_number)[:40]), "error": str(exc)[:200]},
                )
        return entries, unreadable

    def version(self) -> int:
        raw = self.redis.get(VERSION_KEY)
        return int(raw) if raw is not None else 0  # type: ignore[arg-type]

    def load_into(self, view: BlocklistView, version: int) -> None:
        """Reads every list (the version was read before, so a later change is caught by the next poll)."""
        now_ms = self.clock.now_ms()
        entries: list[StoredEntry] = []
        scopes: set[bytes] = self.redis.smembers(SCOPES_KEY)  # type: ignore[assignment]
        for raw_scope in scopes:
            scope = as_text(raw_scope)
            tenant_id = "" if scope == GLOBAL_SCOPE else scope.removeprefix("t:")
            entries.extend(e for e in self._entries(scope, tenant_id) if e.live(now_ms))
        view.replace(entries, version)

    def refresh(self, view: BlocklistView) -> bool:
        """Reloads `view` when the version moved; True when it reloaded."""
        version = self.version()
        if version == view.version:
            return False
        self.load_into(view, version)
        return True


class BlocklistRefresher:
    """A daemon thread that polls the version every `interval` seconds and reloads the view on change.

    Every Redis command it sends is bounded by the client's socket timeout (NUMPROTECT_REDIS_TIMEOUT), so a
    stalled Redis delays a reload, never the stop beyond STOP_WAIT_SECONDS.
    """

    def __init__(self, store: BlocklistStore, view: BlocklistView, interval: float) -> None:
        self.store = store
        self.view = view
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Loads once (best effort: an unreachable Redis is retried by the thread), then polls."""
        try:
            self.store.refresh(self.view)
        except Exception as exc:
            log.warning("blocklist not loaded at start, retrying in the background", extra={"error": repr(exc)})
        self._thread = threading.Thread(target=self._run, name="blocklist-refresh", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.interval):
            try:
                if self.store.refresh(self.view):
                    log.info("blocklist reloaded", extra={"version": self.view.version, "callers": len(self.view)})
                failing = False
            except Exception as exc:
                if not failing:
                    log.warning("blocklist refresh failed, keeping the last copy", extra={"error": repr(exc)})
                failing = True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STOP_WAIT_SECONDS)
            if self._thread.is_alive():
                log.warning("blocklist refresh still reading at shutdown; not waiting for it")
