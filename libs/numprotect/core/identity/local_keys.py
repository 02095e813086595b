"""A local installation's identity (`make run`): the auth key and the first tokens, in one private folder
(.run/dev/ under `make run`, git-ignored; every file mode 600).

- `auth.key`: the key API tokens are hashed with (NUMPROTECT_AUTH_KEY_FILE of every service).
- `operator.token`: an operator API key, to mint the others with AdminService/CreateApiKey.
- `binding.token`: the service key binding presents to allocation (NUMPROTECT_SERVICE_TOKEN_FILE).
- `sip.token`: the carrier key (carrier `cm`, the README's carrier) the SIP adapter presents to translation
  (NUMPROTECT_SERVICE_TOKEN_FILE of sip).

Tokens are reused across runs while Redis still holds their active keys, and minted again otherwise.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from numprotect.core.identity import api_keys
from numprotect.core.identity.api_keys import ApiKeyRecord, HashKey
from numprotect.core.identity.principal import Role


def write_private(path: Path, text: str) -> None:
    """Writes a secret file readable by its owner only (created 600, never briefly wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(text)


def ensure_auth_key(dev_dir: Path) -> Path:
    path = dev_dir / "auth.key"
    if not path.exists():
        write_private(path, HashKey.random().encode() + "\n")
    return path


def _still_valid(redis: Any, hash_key: HashKey, token: str) -> bool:
    parts = api_keys.split_token(token)
    if parts is None:
        return False
    raw = redis.hget(api_keys.KEYS_KEY, parts[0])
    if raw is None:
        return False
    record = ApiKeyRecord.decode(raw)
    now_ms = time.time_ns() // 1_000_000
    return record.active_at(now_ms) and record.token_hash == api_keys.token_hash(hash_key, *parts)


def ensure_token(redis: Any, hash_key: HashKey, path: Path, role: Role, principal_id: str, description: str) -> Path:
    """The token in `path` if Redis still knows it as active, else a new one written there."""
    if path.exists() and _still_valid(redis, hash_key, path.read_text().strip()):
        return path
    _, token = api_keys.mint_sync(
        redis, hash_key, role, principal_id, description=description, now_ms=time.time_ns() // 1_000_000
    )
    write_private(path, token + "\n")
    return path


# The carrier `make run`'s SIP adapter answers for: the README imports its blocks with this carrier_id.
LOCAL_SIP_CARRIER = "cm"


def ensure_dev_tokens(redis: Any, dev_dir: Path) -> dict[str, Path]:
    """The operator's, binding's and the SIP adapter's tokens (see the module docstring)."""
    hash_key = HashKey.from_file("NUMPROTECT_AUTH_KEY_FILE", str(ensure_auth_key(dev_dir)))
    return {
        "operator": ensure_token(
            redis, hash_key, dev_dir / "operator.token", Role.OPERATOR, "", "make run: the local operator"
        ),
        "binding": ensure_token(
            redis, hash_key, dev_dir / "binding.token", Role.SERVICE, "binding", "make run: binding -> allocation"
        ),
        "sip": ensure_token(
            redis,
            hash_key,
            dev_dir / "sip.token",
            Role.CARRIER,
            LOCAL_SIP_CARRIER,
            f"make run: sip -> translation (carrier {LOCAL_SIP_CARRIER})",
        ),
    }
