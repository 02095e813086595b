"""The Redis ACL users of numprotect: one per service, each limited to its own key patterns; no dangerous command.

The one table of who may read and write which keys (docs/redis-schema.md, "ACL users"), from the key layouts:
allocation (core/pool_keys.py, np:lock: from core/routes.py), binding (core/binding_records.py,
core/routes.py, services/binding/store.py), translation (core/routes.py, lua/translate.lua's rate counters,
services/translation/blocklist.py), cdr (core/cdr_keys.py, the binding records it enriches from), events
(core/event_keys.py: the outboxes binding, allocation and cdr write to, and the events service's own keys), sip
(none of its own: it only asks translation) and the identity keys every service shares (core/identity: API keys,
audit log, carriers' blocks).

Read-only patterns use Redis 7's %R~ selectors. EVAL and EVALSHA declare every key they are given as read-write,
so a script's keys cannot be checked there against a read-only pattern: each user therefore has one selector that
allows the script commands on every key it may touch at all, and the commands the script runs are checked one by
one against the user's read/write patterns (a selector allowing only EVAL/EVALSHA permits none of them). A
script of translation can read a route and cannot write one.

Rendered as an ACL file (`render_acl_file`, for redis-server's `aclfile`) or as `ACL SETUSER` commands
(`setuser_commands`, for a Redis that has no file, e.g. a managed one). Passwords appear only as SHA-256 (`#...`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

# Redis 7.0 is the oldest server with %R~/%W~ selectors; CLIENT SETINFO (redis-py sends it on connect and ignores
# a refusal) exists from 7.2 on, and naming it on an older server is an error.
MIN_REDIS_VERSION = (7, 0)
_CLIENT_SETINFO_SINCE = (7, 2)

ADMIN_USER = "numprotect-admin"


@dataclass(frozen=True)
class KeyAccess:
    """A key pattern (Redis glob; `{` and `}` are literal) and whether the user may write it or only read it."""

    pattern: str
    write: bool

    def rule(self) -> str:
        return f"~{self.pattern}" if self.write else f"%R~{self.pattern}"


def _rw(*patterns: str) -> tuple[KeyAccess, ...]:
    return tuple(KeyAccess(pattern, True) for pattern in patterns)


def _ro(*patterns: str) -> tuple[KeyAccess, ...]:
    return tuple(KeyAccess(pattern, False) for pattern in patterns)


# Identity (core/identity): API key records (np:auth) every service reads to check a caller, the audit log every
# service appends to (its script reads the chain's head), the block -> carrier table (allocation writes it; every
# process's identity directory loads it with the keys).
_AUTH = "np:auth:{auth}:*"
_AUDIT = "np:audit:{audit}:*"
_CARRIERS = "np:carriers:{carriers}:*"
# Events (core/event_keys.py): the producers' scripts record events in the outbox of their slot and hint the slot in
# a ring; binding also keeps the slots' binding expiries and their ring. The events service owns every np:ev: key.
_OUTBOXES = ("np:ev:o:*", "np:ev:ring:*")
_EXPIRIES = ("np:ev:x:*", "np:ev:xring:*")

# What every service's client sends besides its data commands: the connection's own commands (AUTH, HELLO,
# PING, SELECT, CLIENT SETNAME), loading a script, a pipeline's MULTI/EXEC, and what cluster clients ask to learn
# the topology (CLUSTER SLOTS/SHARDS/NODES, COMMAND for key positions, READONLY/ASKING for replicas and
# resharding). Data commands come from @read and @write; then everything dangerous is taken away again.
_SERVICE_COMMANDS = (
    "-@all",
    "+@read",
    "+@write",
    "+@transaction",
    "+auth",
    "+hello",
    "+ping",
    "+echo",
    "+select",
    "+time",  # the scripts' clock (in neither @read nor @write)
    "+client|setname",
    "+client|getname",
    "+client|id",
    "+script|load",
    "+script|exists",
    "+cluster|slots",
    "+cluster|shards",
    "+cluster|nodes",
    "+cluster|info",
    "+cluster|myid",
    "+command",
    "+readonly",
    "+readwrite",
    "+asking",
    "-@dangerous",
    "-@admin",
    # Named again although the two categories above hold them: the list the issue asks for, visible here.
    "-flushall",
    "-flushdb",
    "-config",
    "-keys",
    "-debug",
    "-shutdown",
    "-monitor",
    # Key names of other services (SCAN ignores key patterns), other databases, functions and the @write
    # commands that are not ours to run.
    "-scan",
    "-randomkey",
    "-move",
    "-swapdb",
    "-function",
)
# Scripts: only in the selector (see the module docstring).
_SCRIPT_COMMANDS = ("+eval", "+evalsha")


@dataclass(frozen=True)
class AclUser:
    name: str
    purpose: str
    keys: tuple[KeyAccess, ...]

    def rules(self, password_sha256: str, *, redis_version: tuple[int, int] = MIN_REDIS_VERSION) -> list[str]:
        """The user's ACL rules, in order (as in an ACL file line after `user <name>`)."""
        head = ["reset", "on", f"#{password_sha256}", "resetchannels"]
        if self.name == ADMIN_USER:
            return [*head, "~*", "+@all", "-flushall", "-flushdb", "-debug", "-shutdown"]
        commands = list(_SERVICE_COMMANDS)
        if redis_version >= _CLIENT_SETINFO_SINCE:
            commands.insert(commands.index("+client|id") + 1, "+client|setinfo")
        scripts = "(" + " ".join([*_SCRIPT_COMMANDS, *(f"~{access.pattern}" for access in self.keys)]) + ")"
        return [*head, *commands, *(access.rule() for access in self.keys), scripts]


ACL_USERS: tuple[AclUser, ...] = (
    AclUser(
        "numprotect-allocation",
        "allocation: pools, blocks, reservations, number history; number locks; API keys and carriers' blocks",
        (*_rw("np:alloc:*", "np:lock:*", _AUTH, _CARRIERS, _AUDIT, *_OUTBOXES),),
    ),
    AclUser(
        "numprotect-binding",
        "binding: binding records, order keys, tenant lists, number history, the route table; event outboxes and "
        "binding expiries",
        (
            *_rw("np:b:*", "np:ord:*", "np:tl:*", "np:nh:*", "np:rt:*", _AUDIT, *_OUTBOXES, *_EXPIRIES),
            *_ro(_AUTH, _CARRIERS),
        ),
    ),
    AclUser(
        "numprotect-translation",
        "translation: reads routes, locks and carriers; its rate counters and the blocklist",
        (*_rw("np:rl:*", "np:bl:*", _AUDIT), *_ro("np:rt:*", "np:lock:*", _AUTH, _CARRIERS)),
    ),
    AclUser(
        "numprotect-cdr",
        "cdr: its record buckets; reads binding records and number history to enrich, and carriers",
        (*_rw("np:cdr:*", _AUDIT, *_OUTBOXES), *_ro("np:b:*", "np:nh:*", _AUTH, _CARRIERS)),
    ),
    AclUser(
        "numprotect-events",
        "events: every events key (outboxes, expiries, rings, tenants' logs, endpoints and deliveries); reads binding "
        "records (binding.expired, payloads), number history and CDRs",
        (*_rw("np:ev:*", _AUDIT), *_ro("np:b:*", "np:nh:*", "np:cdr:*", _AUTH, _CARRIERS)),
    ),
    AclUser(
        "numprotect-sip",
        "sip: no data of its own (it asks translation); its identity directory reads API keys and carriers, and "
        "calls its gRPC port refuses are audited",
        (*_rw(_AUDIT), *_ro(_AUTH, _CARRIERS)),
    ),
    AclUser(ADMIN_USER, "tooling and the launcher: every key, every command but wiping data or stopping Redis", ()),
)

SERVICE_USERS: Mapping[str, str] = {
    "allocation": "numprotect-allocation",
    "binding": "numprotect-binding",
    "translation": "numprotect-translation",
    "cdr": "numprotect-cdr",
    "events": "numprotect-events",
    "sip": "numprotect-sip",
}


def parse_redis_version(version_output: str) -> tuple[int, int]:
    """(major, minor) from `redis-server --version` ("Redis server v=7.0.15 sha=...")."""
    match = re.search(r"v=(\d+)\.(\d+)", version_output)
    if match is None:
        raise ValueError(f"not a redis-server version: {version_output.strip()!r}")
    return int(match[1]), int(match[2])


def acl_user(name: str) -> AclUser:
    for user in ACL_USERS:
        if user.name == name:
            return user
    raise KeyError(name)


def password_sha256(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def _checked(passwords: Mapping[str, str]) -> None:
    missing = [user.name for user in ACL_USERS if not passwords.get(user.name)]
    if missing:
        raise ValueError(f"no password for the Redis user(s) {', '.join(missing)}")


def render_acl_file(passwords: Mapping[str, str], *, redis_version: tuple[int, int] = MIN_REDIS_VERSION) -> str:
    """An ACL file (redis-server `aclfile`): every user of the table, and the `default` user switched off.

    `default` stays off and without a password (nobody can log in as it), yet keeps every permission: redis-server
    replays its AOF as `default`, and Redis 7.0 re-checks each replayed MULTI/EXEC against that user's rules. With
    `-@all` every write a Lua script made (propagated as MULTI/EXEC) was refused on the restart, NOPERM in the log,
    the data gone (redis/redis issue 14541, fixed in later releases)."""
    _checked(passwords)
    lines = ["user default off resetpass ~* &* +@all"]
    for user in ACL_USERS:
        rules = user.rules(password_sha256(passwords[user.name]), redis_version=redis_version)
        lines.append(" ".join(["user", user.name, *rules]))
    return "\n".join(lines) + "\n"


def setuser_commands(
    passwords: Mapping[str, str], *, redis_version: tuple[int, int] = MIN_REDIS_VERSION
) -> list[list[str]]:
    """The same users as `ACL SETUSER` commands (the `default` user is left to the operator)."""
    _checked(passwords)
    return [
        ["ACL", "SETUSER", user.name, *user.rules(password_sha256(passwords[user.name]), redis_version=redis_version)]
        for user in ACL_USERS
    ]
