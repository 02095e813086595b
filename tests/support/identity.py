"""Identity for tests: one auth key per test session, and API keys minted straight into Redis.

`with_auth(environ)` points a service at the session's key file (unless the environ sets NUMPROTECT_AUTH=off);
`mint(redis, role, id)` stores a key as `make run` and the AdminService do, and returns its token. A service
loads keys minted before it starts; for a key minted later, in-process tests call `RunningService.token`,
which reloads the service's copy at once (processes reload every NUMPROTECT_AUTH_REFRESH_SECONDS, 0.1 s here).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from numprotect.core.identity import api_keys
from numprotect.core.identity.api_keys import HashKey
from numprotect.core.identity.directory import (
    CARRIER_BLOCKS_KEY,
    CARRIER_VERSION_KEY,
    RECORD_BLOCK_CARRIER,
    block_of,
)
from numprotect.core.identity.principal import Role

__all__ = [
    "PEER_CALLERS",
    "Role",
    "auth_env",
    "mint",
    "mint_from_url",
    "mint_in",
    "record_blocks",
    "service_token_env",
    "test_hash_key",
    "with_auth",
]


@cache
def _key_file() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="numprotect-test-auth-"))
    path = folder / "auth.key"
    path.write_text(HashKey.random().encode())
    path.chmod(0o600)
    return path


def test_hash_key() -> HashKey:
    return HashKey.from_file("test", str(_key_file()))


def auth_env() -> dict[str, str]:
    return {"NUMPROTECT_AUTH_KEY_FILE": str(_key_file()), "NUMPROTECT_AUTH_REFRESH_SECONDS": "0.1"}


def with_auth(environ: Mapping[str, str]) -> dict[str, str]:
    if environ.get("NUMPROTECT_AUTH") == "off":
        return dict(environ)
    return {**auth_env(), **environ}


def mint(redis: Any, role: Role, principal_id: str = "", *, description: str = "test") -> str:
    """A new token for `role` (`principal_id`: the tenant, carrier or service), stored via a blocking client."""
    _, token = api_keys.mint_sync(
        redis, test_hash_key(), role, principal_id, description=description, now_ms=time.time_ns() // 1_000_000
    )
    return token


def record_blocks(redis: Any, carrier_id: str, *numbers: str) -> None:
    """Records `carrier_id` as the carrier of each number's 11-digit block, as ImportBlock does (a block another
    carrier already routes stays that carrier's)."""
    script = redis.register_script(RECORD_BLOCK_CARRIER)
    for block in {block_of(number) for number in numbers}:
        script(keys=[CARRIER_BLOCKS_KEY, CARRIER_VERSION_KEY], args=[block, carrier_id])


def mint_from_url(redis_url: str, role: Role, principal_id: str = "") -> str:
    """`mint` through a short-lived client of the Redis at `redis_url` (standalone)."""
    import redis as redis_py

    client = redis_py.Redis.from_url(redis_url)
    try:
        return mint(client, role, principal_id)
    finally:
        client.close()


def mint_in(environ: Mapping[str, str], role: Role, principal_id: str = "") -> str:
    """`mint` in the Redis a service of `environ` uses (NUMPROTECT_REDIS_URL, standalone or cluster mode)."""
    if environ.get("NUMPROTECT_REDIS_MODE", "standalone") == "standalone":
        return mint_from_url(environ["NUMPROTECT_REDIS_URL"], role, principal_id)
    from redis.cluster import RedisCluster

    client: Any = RedisCluster.from_url(environ["NUMPROTECT_REDIS_URL"])
    try:
        return mint(client, role, principal_id)
    finally:
        client.close()


# Who calls a peer, as whom: binding as its service (allocation), sip as a carrier (translation; `make run`'s
# carrier, whose blocks tests record with record_blocks when they route calls through the adapter).
PEER_CALLERS: Mapping[str, tuple[Role, str]] = {"binding": (Role.SERVICE, "binding"), "sip": (Role.CARRIER, "cm")}


def service_token_env(environ: Mapping[str, str], service: str) -> dict[str, str]:
    """NUMPROTECT_SERVICE_TOKEN_FILE for a process of `service` that calls peers (PEER_CALLERS), minted in the Redis
    of `environ`; nothing when auth is off, a token file is already set, or the service calls no peer."""
    caller = PEER_CALLERS.get(service)
    if caller is None or environ.get("NUMPROTECT_AUTH") == "off" or "NUMPROTECT_SERVICE_TOKEN_FILE" in environ:
        return {}
    token = mint_in(environ, *caller)
    path = _key_file().parent / f"{service}-{time.time_ns()}.token"
    path.write_text(token)
    path.chmod(0o600)
    return {"NUMPROTECT_SERVICE_TOKEN_FILE": str(path)}
