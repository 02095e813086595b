"""`numprotect-mint-key`: mints an API key straight into Redis, for the keys that must exist before AdminService
can mint any: the first operator key and binding's service key (docs/deploy.md, "Identity: the auth key and the
first keys"). Every later key comes from AdminService/CreateApiKey.

    numprotect-mint-key --role service --id binding --out binding.token
    numprotect-mint-key --role operator --description "first operator" --out - >operator.token

It reads the auth key (NUMPROTECT_AUTH_KEY_FILE, the same file the services hash tokens with) and Redis
(NUMPROTECT_REDIS_*, standalone or cluster) from the environment, so it needs a Redis user that may write
np:auth:{auth}:* (the admin user or allocation's). The token is written to `--out` (created mode 600, refused if
the file exists) and printed only for `--out -`; the key is stored only after the file is written, so no key
exists whose token was lost. Like CreateApiKey it writes one audit event (method "numprotect-mint-key").
A bad option or setting: one line on stderr and exit status 2; Redis refusing: one line and status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn

from redis.exceptions import RedisClusterException, RedisError

from numprotect.core.identifiers import CARRIER_ID, TENANT_ID, IdentifierRule
from numprotect.core.identity import api_keys
from numprotect.core.identity.api_keys import ApiKeyRecord, AuthSettings, HashKey
from numprotect.core.identity.audit import AuditEvent, AuditLog
from numprotect.core.identity.local_keys import write_private
from numprotect.core.identity.principal import Principal, Role
from numprotect.core.redis_client import create_sync_redis
from numprotect.core.settings import SERVICE_NAMES, Env, RedisSettings, SettingsError

PROG = "numprotect-mint-key"
AUDIT_METHOD = PROG  # the audit trail's "method" of a key minted here (AdminService's is its RPC path)
BOOTSTRAP = "bootstrap"  # created_by of the key and principal of its audit event
DESCRIPTION_LIMIT = 256  # as CreateApiKey's
MAX_EXPIRE_SECONDS = 10 * 365 * 86400
# The rule each role's --id follows; operator and regulator keys name nobody.
_ID_RULES: dict[Role, IdentifierRule | None] = {Role.TENANT: TENANT_ID, Role.CARRIER: CARRIER_ID}


class UsageError(Exception):
    """A bad option or setting; str() is the one line shown."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: the caller is often a script or a Job's log.
        raise UsageError(message)


def parser() -> argparse.ArgumentParser:
    cli = _Parser(prog=PROG, description=__doc__.split("\n\n", 1)[0], allow_abbrev=False)
    cli.add_argument("--role", required=True, choices=[role.value for role in Role])
    cli.add_argument("--id", default="", help="tenant_id, carrier_id or service name, as the role needs")
    cli.add_argument("--description", default="", help=f"what the key is for (at most {DESCRIPTION_LIMIT} chars)")
    cli.add_argument("--out", required=True, help="file for the token (mode 600; must not exist), or - for stdout")
    cli.add_argument("--expire-in", default="", help="e.g. 90d or 12h (default: never expires)")
    return cli


def principal_of(role_name: str, principal_id: str) -> Principal:
    """The principal a key of `role_name` for `principal_id` stands for (UsageError naming --id and its rule)."""
    role = Role(role_name)
    if role in (Role.OPERATOR, Role.REGULATOR):
        if principal_id:
            raise UsageError(f"--id: must be empty for role {role.value}")
        return Principal(role)
    if role is Role.SERVICE:
        if principal_id not in SERVICE_NAMES:
            raise UsageError(f"--id: must be one of {', '.join(SERVICE_NAMES)} for role service")
        return Principal(role, principal_id)
    rule = _ID_RULES[role]
    assert rule is not None
    problem = rule.violation("--id", principal_id)
    if problem is not None:
        raise UsageError(f"--id: {problem.description} for role {role.value}")
    return Principal(role, principal_id)


def expire_ms(raw: str, now_ms: int) -> int:
    if not raw:
        return 0
    seconds = Env({"--expire-in": raw}).seconds("--expire-in", 0.0, minimum=1.0, maximum=MAX_EXPIRE_SECONDS)
    return now_ms + int(seconds * 1000)


def mint(
    options: argparse.Namespace, environ: Mapping[str, str], now_ms: int
) -> tuple[ApiKeyRecord, str, RedisSettings, HashKey]:
    """Validates everything (UsageError) and makes the key; nothing is written yet."""
    principal = principal_of(options.role, options.id)
    if len(options.description) > DESCRIPTION_LIMIT:
        raise UsageError(f"--description: at most {DESCRIPTION_LIMIT} characters")
    if options.out != "-" and Path(options.out).exists():
        raise UsageError(f"--out: {options.out} exists (a token is never overwritten: remove it or name another)")
    try:
        expiry = expire_ms(options.expire_in, now_ms)
        env = Env(environ)
        # This tool needs the key whatever NUMPROTECT_AUTH says (the services' setting, not its own).
        hash_key = AuthSettings.from_env(Env({**environ, "NUMPROTECT_AUTH": "on"})).hash_key
        redis_settings = RedisSettings.from_env(env)
    except SettingsError as exc:
        raise UsageError(str(exc)) from None
    assert hash_key is not None
    record, token = api_keys.new_key(
        hash_key,
        principal.role,
        principal.id,
        description=options.description or f"{PROG}: {principal.subject}",
        created_by=BOOTSTRAP,
        now_ms=now_ms,
        expire_ms=expiry,
    )
    return record, token, redis_settings, hash_key


def audit_event(record: ApiKeyRecord, now_ms: int) -> AuditEvent:
    principal = record.principal
    target = f"role={principal.role.value},id={principal.id or '(empty)'},key_id={record.key_id}"
    return AuditEvent(
        time_ms=now_ms,
        principal=BOOTSTRAP,
        role="",
        method=AUDIT_METHOD,
        target=target,
        reason="",
        outcome="OK",
        trace_id="",
        peer=f"local:{os.getpid()}",
    )


def run(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    now_ms = time.time_ns() // 1_000_000
    try:
        options = parser().parse_args(argv)
        record, token, redis_settings, hash_key = mint(options, environ, now_ms)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    out = None if options.out == "-" else Path(options.out)
    # The file first: a stored key whose token never reached its file would be a live key nobody holds.
    if out is not None:
        try:
            write_private(out, token + "\n")
        except OSError as exc:
            print(f"{PROG}: no key minted: --out {out}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    redis = None
    try:
        redis = create_sync_redis(redis_settings, max_connections=2)  # a cluster client connects here
        api_keys.store_sync(redis, record)
        audit = AuditLog(hash_key.derive("audit"), redis)
        audit.start()
        audit.record(audit_event(record, now_ms))
        audit.stop()
    except (RedisError, RedisClusterException, OSError) as exc:
        if out is not None:
            out.unlink(missing_ok=True)
        print(f"{PROG}: no key minted: Redis {redis_settings.url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if redis is not None:
            redis.close()
    if out is None:
        print(token, flush=True)
    who = Principal(Role(record.role), record.principal_id).subject
    where = "stdout" if out is None else f"{out} (mode 600)"
    print(f"{PROG}: key {record.key_id} for {who}: token in {where}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(sys.argv[1:] if argv is None else argv, os.environ)


if __name__ == "__main__":
    sys.exit(main())
