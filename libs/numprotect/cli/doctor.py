"""`numprotect doctor`: the invariant checker (numprotect.core.doctor, also the `numprotect-doctor` script) with
the same options, run in this process. It reads Redis directly (NUMPROTECT_REDIS_* or --redis-url), not the
services: the context plays no part. `--output table` is the checker's text report."""

from __future__ import annotations

from types import MappingProxyType

import typer

from numprotect.cli.connection import session_of
from numprotect.cli.failures import EXIT_CHECK_FAILED, EXIT_CONFIG

_OUTPUT_NAMES = MappingProxyType({"table": "text"})


def _checker_args(args: list[str]) -> list[str]:
    """The arguments as numprotect-doctor takes them: -o for --output, table for text."""
    converted: list[str] = []
    for arg in args:
        previous = converted[-1] if converted else ""
        if arg == "-o":
            converted.append("--output")
        elif arg.startswith("--output="):
            name = arg.partition("=")[2]
            converted.append(f"--output={_OUTPUT_NAMES.get(name, name)}")
        elif previous == "--output":
            converted.append(_OUTPUT_NAMES.get(arg, arg))
        else:
            converted.append(arg)
    return converted


def doctor(ctx: typer.Context) -> None:
    """Check numprotect's invariants on the live Redis (read only). Options: numprotect doctor --help.
    Exit status: 0 clean, 20 violations found, 78 a bad option or setting or Redis failing."""
    # Imported when run: the checker loads redis.asyncio and every key schema, ~0.4 s of CPU that each other
    # command paid at start-up when this module imported it.
    from numprotect.core.doctor import cli as doctor_cli

    session = session_of(ctx)
    status = doctor_cli.run(_checker_args(list(ctx.args)), session.environ)
    # The checker's exit status -> this CLI's (numprotect.cli.failures).
    exits = {
        doctor_cli.EXIT_CLEAN: 0,
        doctor_cli.EXIT_VIOLATIONS: EXIT_CHECK_FAILED,
        doctor_cli.EXIT_ERROR: EXIT_CONFIG,
    }
    raise typer.Exit(exits.get(status, status))


CONTEXT_SETTINGS = MappingProxyType({"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
