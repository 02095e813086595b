"""`numprotect-doctor` (or `python -m numprotect.core.doctor`): checks numprotect's invariants on a live Redis.

    numprotect-doctor                                   # the Redis of NUMPROTECT_REDIS_* (as the services)
    numprotect-doctor --keys-per-second 2000 --batch 100 # gentler on a busy production Redis
    numprotect-doctor --output json                      # for scripts and the chaos suite

Settings come from the environment the services read (NUMPROTECT_REDIS_URL, NUMPROTECT_REDIS_MODE, the ACL user,
password file and TLS; NUMPROTECT_BINDING_CREATE_LEASE and NUMPROTECT_BINDING_RECOVERY_INTERVAL); the flags
override them. It only reads: a Redis user
with read access to np:* and SCAN/EVALSHA is enough (numprotect-admin has it). Exit status: 0 clean, 1
violations found, 2 a bad option or setting or Redis failing (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import NoReturn

from redis.exceptions import RedisClusterException, RedisError

from numprotect.core.doctor import Options, scan
from numprotect.core.settings import Env, RedisSettings, SettingsError

PROG = "numprotect-doctor"
EXIT_CLEAN, EXIT_VIOLATIONS, EXIT_ERROR = 0, 1, 2


class UsageError(Exception):
    """A bad option or setting; str() is the one line shown."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError
    return value


def parser() -> argparse.ArgumentParser:
    cli = _Parser(prog=PROG, description=__doc__.split("\n\n", 1)[0], allow_abbrev=False)
    cli.add_argument("--redis-url", help="overrides NUMPROTECT_REDIS_URL")
    cli.add_argument("--redis-mode", choices=["standalone", "cluster"], help="overrides NUMPROTECT_REDIS_MODE")
    cli.add_argument("--output", choices=["text", "json"], default="text")
    cli.add_argument("--batch", type=_positive, default=200, help="SCAN COUNT and pipelined reads (default 200)")
    cli.add_argument(
        "--keys-per-second", type=_non_negative, default=0.0, help="pace of the walk (default 0: unlimited)"
    )
    cli.add_argument("--create-lease", type=_non_negative, help="overrides NUMPROTECT_BINDING_CREATE_LEASE (s)")
    cli.add_argument(
        "--recovery-interval", type=_non_negative, help="overrides NUMPROTECT_BINDING_RECOVERY_INTERVAL (s)"
    )
    cli.add_argument("--recheck", type=_non_negative, default=1.0, help="pause (s) before a suspect is re-read")
    cli.add_argument("--examples", type=_positive, default=3, help="examples shown per kind in the text output")
    return cli


def options_from(args: argparse.Namespace, env: Env) -> tuple[RedisSettings, Options]:
    redis = RedisSettings.from_env(env)
    # Read as binding reads them (services/binding/settings.py): the checker judges by binding's own timing.
    lease = env.seconds("NUMPROTECT_BINDING_CREATE_LEASE", 10.0, minimum=0.5, maximum=600.0)
    recovery = env.seconds("NUMPROTECT_BINDING_RECOVERY_INTERVAL", 5.0, minimum=0.05, maximum=600.0)
    options = Options(
        batch=args.batch,
        keys_per_second=args.keys_per_second,
        create_lease_seconds=lease if args.create_lease is None else args.create_lease,
        recovery_seconds=recovery if args.recovery_interval is None else args.recovery_interval,
        recheck_seconds=args.recheck,
    )
    return redis, options


def run(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    """The command without the process around it: prints the report, returns the exit status."""
    try:
        args = parser().parse_args(argv)
        overrides = {
            name: value
            for name, value in (("NUMPROTECT_REDIS_URL", args.redis_url), ("NUMPROTECT_REDIS_MODE", args.redis_mode))
            if value is not None
        }
        redis, options = options_from(args, Env({**environ, **overrides}))
    except (UsageError, SettingsError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        report = scan(redis, replace(options))
    except (RedisError, RedisClusterException, OSError) as exc:
        print(f"{PROG}: Redis at {redis.url} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(report.to_json() if args.output == "json" else report.to_text(args.examples))
    return EXIT_CLEAN if report.clean else EXIT_VIOLATIONS


def main() -> None:
    sys.exit(run(sys.argv[1:], os.environ))
