"""API keys: high-entropy bearer tokens, shown once, stored only as a keyed hash.

    token   = "npk_" + key_id (16 hex) + "_" + secret (43 url-safe base64 characters, 256 bits)
    stored  = HMAC-SHA256(hash key, domain | key_id | secret), in the key's record in Redis

The hash key (NUMPROTECT_AUTH_KEY_FILE) lives outside Redis: whoever can write to Redis can delete or revoke
keys but cannot mint a token that verifies. Every record lives in one hash under the hash tag {auth}, with a
version counter that every change bumps, so each process reloads its copy (`directory`) only after a change.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from numprotect.core.identity.principal import Principal, Role
from numprotect.core.settings import Env, SettingsError

KEYS_KEY = "np:auth:{auth}:keys"
VERSION_KEY = "np:auth:{auth}:ver"
TOKEN_PREFIX = "npk_"
MIN_HASH_KEY_BYTES = 32
_TOKEN = re.compile(r"npk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
_DOMAIN = b"numprotect.api_key\x00"


class HashKey:
    """The secret API keys are hashed with (and the audit chain is keyed from). Its repr never shows it."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_HASH_KEY_BYTES:
            raise ValueError(f"the auth key needs at least {MIN_HASH_KEY_BYTES} bytes")
        self._secret = secret

    def __repr__(self) -> str:
        return "HashKey(<secret>)"

    @classmethod
    def random(cls) -> HashKey:
        return cls(secrets.token_bytes(MIN_HASH_KEY_BYTES))

    @classmethod
    def from_file(cls, variable: str, path: str) -> HashKey:
        """The key from a file holding base64 of at least 32 bytes (SettingsError naming the variable, not the key)."""
        try:
            raw = Path(path).read_text().strip()
        except OSError as exc:
            raise SettingsError(f"{variable}: cannot read {path} ({exc.strerror})") from None
        try:
            return cls(base64.b64decode(raw, validate=True))
        except (binascii.Error, ValueError):
            raise SettingsError(f"{variable}: {path} must hold base64 of at least {MIN_HASH_KEY_BYTES} bytes") from None

    def encode(self) -> str:
        """The file content `from_file` reads (for `make run` and tests writing a key)."""
        return base64.b64encode(self._secret).decode()

    def mac(self, domain: bytes, *parts: bytes) -> bytes:
        digest = hmac.new(self._secret, domain, hashlib.sha256)
        for part in parts:
            digest.update(len(part).to_bytes(4, "big"))
            digest.update(part)
        return digest.digest()

    def derive(self, purpose: str) -> HashKey:
        """An independent key for another use (the audit chain), so one secret file serves both."""
        return HashKey(self.mac(b"numprotect.derive\x00", purpose.encode()))


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """NUMPROTECT_AUTH (on, or off only for a benchmark baseline), the hash key, and how often each process
    reloads keys and carrier blocks (revocation takes effect within that interval plus one reload)."""

    enabled: bool
    hash_key: HashKey | None
    refresh_seconds: float

    @classmethod
    def from_env(cls, env: Env) -> AuthSettings:
        enabled = env.choice("NUMPROTECT_AUTH", "on", ("on", "off")) == "on"
        refresh = env.seconds("NUMPROTECT_AUTH_REFRESH_SECONDS", 1.0, minimum=0.05, maximum=2.0)
        path = env.raw("NUMPROTECT_AUTH_KEY_FILE")
        if not enabled:
            return cls(False, HashKey.from_file("NUMPROTECT_AUTH_KEY_FILE", path) if path else None, refresh)
        if not path:
            raise SettingsError("NUMPROTECT_AUTH_KEY_FILE: required (a file with base64 of >= 32 random bytes)")
        return cls(True, HashKey.from_file("NUMPROTECT_AUTH_KEY_FILE", path), refresh)


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """What Redis holds of a key (never the token)."""

    key_id: str
    role: str
    principal_id: str  # tenant_id, carrier_id or service name, as the role needs
    description: str
    created_by: str
    create_ms: int
    expire_ms: int  # 0: never
    revoke_ms: int  # 0: active
    token_hash: str

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def decode(cls, raw: str | bytes) -> ApiKeyRecord:
        fields: dict[str, Any] = json.loads(raw)
        return cls(**fields)

    @property
    def principal(self) -> Principal:
        return Principal(Role(self.role), self.principal_id, self.key_id)

    def active_at(self, now_ms: int) -> bool:
        return self.revoke_ms == 0 and (self.expire_ms == 0 or now_ms < self.expire_ms)

    def revoked(self, at_ms: int) -> ApiKeyRecord:
        return replace(self, revoke_ms=at_ms)


def token_hash(hash_key: HashKey, key_id: str, secret: str) -> str:
    return hash_key.mac(_DOMAIN, key_id.encode(), secret.encode()).hex()


def split_token(token: str) -> tuple[str, str] | None:
    """(key_id, secret) of a well-formed token, else None."""
    match = _TOKEN.fullmatch(token)
    return (match.group(1), match.group(2)) if match else None


def new_key(
    hash_key: HashKey,
    role: Role,
    principal_id: str,
    *,
    description: str,
    created_by: str,
    now_ms: int,
    expire_ms: int = 0,
) -> tuple[ApiKeyRecord, str]:
    """A new key's record and its token (the only time the token exists outside the caller)."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    record = ApiKeyRecord(
        key_id=key_id,
        role=role.value,
        principal_id=principal_id,
        description=description,
        created_by=created_by,
        create_ms=now_ms,
        expire_ms=expire_ms,
        revoke_ms=0,
        token_hash=token_hash(hash_key, key_id, secret),
    )
    return record, f"{TOKEN_PREFIX}{key_id}_{secret}"


def store_sync(redis: Any, record: ApiKeyRecord) -> None:
    """Writes (or overwrites) a record and bumps the version, atomically (one slot: {auth})."""
    pipe = redis.pipeline(transaction=True)
    pipe.hset(KEYS_KEY, record.key_id, record.encode())
    pipe.incr(VERSION_KEY)
    pipe.execute()


async def store(redis: Any, record: ApiKeyRecord) -> None:
    """`store_sync` on redis.asyncio."""
    pipe = redis.pipeline(transaction=True)
    pipe.hset(KEYS_KEY, record.key_id, record.encode())
    pipe.incr(VERSION_KEY)
    await pipe.execute()


async def load(redis: Any, key_id: str) -> ApiKeyRecord | None:
    raw = await redis.hget(KEYS_KEY, key_id)
    return ApiKeyRecord.decode(raw) if raw is not None else None


async def load_all(redis: Any) -> list[ApiKeyRecord]:
    raw: dict[Any, Any] = await redis.hgetall(KEYS_KEY)
    return sorted((ApiKeyRecord.decode(v) for v in raw.values()), key=lambda r: (r.create_ms, r.key_id))


def mint_sync(
    redis: Any, hash_key: HashKey, role: Role, principal_id: str, *, description: str, now_ms: int
) -> tuple[ApiKeyRecord, str]:
    """Creates and stores a key from a blocking client: how `make run` and tests mint their first tokens."""
    record, token = new_key(
        hash_key, role, principal_id, description=description, created_by="bootstrap", now_ms=now_ms
    )
    store_sync(redis, record)
    return record, token
