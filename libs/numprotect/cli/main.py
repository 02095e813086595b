"""The `numprotect` command: root options, the command groups, and one place that turns every failure into one
line on stderr and an exit status (numprotect.cli.failures)."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from typer._click import exceptions as click_exceptions
from typer.core import TyperGroup

from numprotect.cli import doctor
from numprotect.cli.connection import DEFAULT_TIMEOUT_SECONDS, Session
from numprotect.cli.contexts import CONFIG_ENV, CONTEXT_ENV, default_config_path
from numprotect.cli.failures import (
    EXIT_INTERRUPTED,
    EXIT_SOFTWARE,
    EXIT_USAGE,
    PROG,
    CliError,
    describe_rpc_error,
    exit_code_of,
)

# (name, module with a typer app): each becomes `numprotect <name> ...`.
COMMAND_GROUPS: tuple[tuple[str, str], ...] = (
    ("config", "numprotect.cli.config_commands"),
    ("keys", "numprotect.cli.keys"),
    ("numbers", "numprotect.cli.numbers"),
    ("bindings", "numprotect.cli.bindings"),
    ("cdrs", "numprotect.cli.cdrs"),
    ("endpoints", "numprotect.cli.endpoints"),
    ("events", "numprotect.cli.events"),
    ("audit", "numprotect.cli.audit"),
    ("blocks", "numprotect.cli.blocks"),
    ("pool", "numprotect.cli.pool"),
)


def _fail(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)


class NumprotectGroup(TyperGroup):
    """Runs the command in click's non-standalone mode and maps what it raises to one line and an exit status,
    for the console script and for typer's CliRunner alike."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        code = run_group(self, args, prog_name or PROG, complete_var, **extra)
        if standalone_mode:
            sys.exit(code)
        return code


def run_group(
    group: TyperGroup, args: Sequence[str] | None, prog_name: str, complete_var: str | None, **extra: Any
) -> int:
    try:
        result = TyperGroup.main(group, args, prog_name, complete_var, standalone_mode=False, **extra)
    except grpc.RpcError as error:
        _fail(describe_rpc_error(error))
        return exit_code_of(error)
    except CliError as error:
        _fail(" ".join(str(error).split()))
        return error.exit_code
    except click_exceptions.NoArgsIsHelpError:
        return EXIT_USAGE  # the help was printed
    except click_exceptions.UsageError as error:
        command = error.ctx.command_path if error.ctx is not None else prog_name
        _fail(f"usage: {error.format_message()} (see {command} --help)")
        return EXIT_USAGE
    except click_exceptions.ClickException as error:
        _fail(error.format_message())
        return EXIT_USAGE
    except (KeyboardInterrupt, typer.Abort):
        _fail("interrupted")
        return EXIT_INTERRUPTED
    except typer.Exit as exit_:
        return exit_.exit_code
    except Exception as error:  # a bug here: still one line, never a traceback
        _fail(f"internal error: {type(error).__name__}: {error}")
        return EXIT_SOFTWARE
    return result if isinstance(result, int) else 0


def build_app() -> typer.Typer:
    app = typer.Typer(
        cls=NumprotectGroup,
        name=PROG,
        help="Operate numprotect: keys, numbers, bindings, CDRs, webhooks, the audit trail, invariants (docs/cli.md).",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )

    @app.callback()
    def root(
        ctx: typer.Context,
        context: Annotated[
            str | None, typer.Option("--context", envvar=CONTEXT_ENV, help="the context to use (not the current one)")
        ] = None,
        config: Annotated[
            Path | None, typer.Option("--config", envvar=CONFIG_ENV, help="config file [~/.config/numprotect/...]")
        ] = None,
        timeout: Annotated[
            float,
            typer.Option("--timeout", envvar="NUMPROTECT_TIMEOUT", min=0.001, help="deadline of each call, seconds"),
        ] = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        environ = dict(os.environ)
        ctx.obj = Session(config or default_config_path(environ), context, timeout, environ)

    for name, module in COMMAND_GROUPS:
        app.add_typer(importlib.import_module(module).app, name=name)
    # The checker's own options pass through untouched (its --help is the checker's).
    app.command("doctor", context_settings=dict(doctor.CONTEXT_SETTINGS), add_help_option=False)(doctor.doctor)
    return app


def main() -> None:
    build_app()(prog_name=PROG)
