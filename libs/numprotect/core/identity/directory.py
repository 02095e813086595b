"""Each process's in-memory copy of the API keys and of which carrier routes which block.

Checking a caller must cost no Redis round trip (translation answers in well under a millisecond), so every
process keeps a copy and a background thread reloads it: each interval it reads two version counters and
reloads only what changed. A revoked or expired key therefore stops working within one interval plus one
reload (NUMPROTECT_AUTH_REFRESH_SECONDS, default 1 s; the contract is 3 s), in every process, also on streams
already open (the call layer re-checks a stream's principal, `layer`).

Carrier blocks: `ImportBlock` records the carrier that routes each 11-digit block; a carrier principal may
translate and report calls only for numbers of its own blocks.

A key id or a block the copy does not know yet (minted or imported a moment ago, in another process) triggers one
reload at once instead of waiting for the interval: at most one such reload per `MISS_RELOAD_SECONDS`, so a caller
sending unknown ids costs at most a few version reads per second, and the hot path of known callers none.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from numprotect.core.identity import api_keys
from numprotect.core.identity.api_keys import ApiKeyRecord, HashKey
from numprotect.core.identity.principal import Principal
from numprotect.core.redis_client import as_text

log = logging.getLogger(__name__)

CARRIER_BLOCKS_KEY = "np:carriers:{carriers}:blocks"  # hash: 11-digit block -> carrier_id
CARRIER_VERSION_KEY = "np:carriers:{carriers}:ver"
BLOCK_DIGITS = 11
_VERIFIED_CACHE_LIMIT = 4096
MISS_RELOAD_SECONDS = 0.1

# Records a block's carrier; refuses (returns the holder) when another carrier already routes it.
RECORD_BLOCK_CARRIER = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and current ~= ARGV[2] then return current end
if not current then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('INCR', KEYS[2])
end
return ARGV[2]
"""


def block_of(virtual_number: str) -> str:
    return virtual_number[:BLOCK_DIGITS]


class Directory:
    """The keys and carrier blocks as of the last reload. `authenticate` and `carrier_of` are lock-free reads
    of immutable snapshots that the refresher swaps whole."""

    def __init__(self, hash_key: HashKey, redis: Any, *, refresh_seconds: float, now_ms: Callable[[], int]) -> None:
        self._hash_key = hash_key
        self._redis = redis  # a blocking client of its own: reloads never wait behind the service's calls
        self._refresh_seconds = refresh_seconds
        self._now_ms = now_ms
        self._keys: dict[str, ApiKeyRecord] = {}
        self._verified: dict[str, ApiKeyRecord] = {}
        self._blocks: dict[str, str] = {}
        self._versions: tuple[bytes | None, bytes | None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._miss_lock = threading.Lock()
        self._last_miss_reload = -MISS_RELOAD_SECONDS

    # -- reads on the call path ------------------------------------------------------------------------------
    def authenticate(self, token: str) -> Principal | None:
        """The principal of a valid, unexpired, unrevoked token; None for anything else (no reason given)."""
        record = self._verified.get(token)
        if record is None:
            parts = api_keys.split_token(token)
            if parts is None:
                return None
            candidate = self._keys.get(parts[0])
            if candidate is None and self._reload_on_miss():
                candidate = self._keys.get(parts[0])
            expected = api_keys.token_hash(self._hash_key, parts[0], parts[1])
            # Compared even for an unknown key id, against a dummy: timing does not tell which ids exist.
            stored = candidate.token_hash if candidate is not None else "0" * len(expected)
            if not _equal(stored, expected) or candidate is None:
                return None
            record = candidate
            verified = self._verified
            if len(verified) >= _VERIFIED_CACHE_LIMIT:
                verified.clear()
            verified[token] = record
        if not record.active_at(self._now_ms()):
            return None
        return record.principal

    def still_valid(self, principal: Principal) -> bool:
        """Whether a key-based principal's key is still active (a certificate's principal always is: its
        validity was checked at the handshake)."""
        if not principal.key_id:
            return True
        record = self._keys.get(principal.key_id)
        return record is not None and record.active_at(self._now_ms())

    def carrier_of(self, virtual_number: str) -> str | None:
        """The carrier that routes the number's block, or None when no carrier is recorded for it."""
        block = block_of(virtual_number)
        carrier = self._blocks.get(block)
        if carrier is None and self._reload_on_miss():
            carrier = self._blocks.get(block)
        return carrier

    def _reload_on_miss(self) -> bool:
        """One reload now unless one ran within MISS_RELOAD_SECONDS; True when it ran and changed something."""
        with self._miss_lock:
            now = time.monotonic()
            if now - self._last_miss_reload < MISS_RELOAD_SECONDS:
                return False
            self._last_miss_reload = now
            try:
                return self.reload()
            except Exception as exc:  # Redis unreachable: the copy stands, the caller is refused as unknown
                log.debug("identity directory reload on a miss failed", extra={"error": repr(exc)})
                return False

    # -- reloading -------------------------------------------------------------------------------------------
    def reload(self) -> bool:
        """Reloads what changed since the last reload; True when something did. Raises on a Redis error."""
        versions = (self._redis.get(api_keys.VERSION_KEY), self._redis.get(CARRIER_VERSION_KEY))
        previous = self._versions
        if previous is not None and versions == previous:
            return False
        if previous is None or versions[0] != previous[0]:
            raw = self._redis.hgetall(api_keys.KEYS_KEY)
            keys = {record.key_id: record for record in map(ApiKeyRecord.decode, raw.values())}
            self._keys = keys
            self._verified = {}
        if previous is None or versions[1] != previous[1]:
            raw_blocks = self._redis.hgetall(CARRIER_BLOCKS_KEY)
            self._blocks = {as_text(block): as_text(carrier) for block, carrier in raw_blocks.items()}
        self._versions = versions
        return True

    def start(self) -> None:
        """One reload now (a failure is logged: every token is refused until a reload succeeds), then the
        refresher thread."""
        self._reload_logged()
        self._thread = threading.Thread(target=self._run, name="identity-directory", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._refresh_seconds):
            self._reload_logged()

    def _reload_logged(self) -> None:
        try:
            if self.reload():
                log.info("identity directory loaded", extra={"keys": len(self._keys), "blocks": len(self._blocks)})
        except Exception as exc:  # the next interval retries; the last good copy stays in use
            log.warning("identity directory reload failed", extra={"error": repr(exc)})


def _equal(left: str, right: str) -> bool:
    return hmac.compare_digest(left, right)
