"""`numprotect config ...`: the contexts of the config file (set-context, use-context, get-contexts,
current-context, delete-context)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from numprotect.cli.connection import session_of
from numprotect.cli.contexts import SERVICES, Context, absolute, from_run_dir
from numprotect.cli.output import OutputFormat, OutputOption, Printer

app = typer.Typer(help="Contexts: where the services are, the CA, the client certificate and the token file.")


def _addresses(context: Context) -> str:
    parts = [f"host {context.host}"] if context.host else []
    parts += [f"{service} {getattr(context, service)}" for service in SERVICES if getattr(context, service)]
    return ", ".join(parts)


def _token_source(context: Context) -> str:
    sources = [f"${context.token_env}"] if context.token_env else []
    sources += [context.token_file] if context.token_file else []
    return " or ".join(sources)


def _described(context: Context, current: str) -> dict[str, Any]:
    """What get-contexts shows of a context: its settings, paths and variable names (a token never)."""
    return {"name": context.name, "current": context.name == current, **context.to_yaml()}


@app.command("set-context")
def set_context(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="the context to create or change")],
    host: Annotated[str | None, typer.Option(help="every service on this host at its default port")] = None,
    allocation: Annotated[str | None, typer.Option(help="allocation's (and AdminService's) host:port")] = None,
    binding: Annotated[str | None, typer.Option(help="binding's host:port")] = None,
    translation: Annotated[str | None, typer.Option(help="translation's host:port")] = None,
    cdr: Annotated[str | None, typer.Option(help="cdr's host:port")] = None,
    events: Annotated[str | None, typer.Option(help="events' host:port")] = None,
    ca_file: Annotated[str | None, typer.Option(help="CA bundle (PEM) that verifies the servers")] = None,
    cert_file: Annotated[str | None, typer.Option(help="mTLS: client certificate chain (PEM)")] = None,
    key_file: Annotated[str | None, typer.Option(help="mTLS: the client certificate's key (PEM)")] = None,
    token_file: Annotated[str | None, typer.Option(help="file holding the API key's token")] = None,
    token_env: Annotated[str | None, typer.Option(help="variable holding the token (wins when set)")] = None,
    server_name: Annotated[str | None, typer.Option(help="name in the server certificate, if not the host")] = None,
    insecure: Annotated[
        bool | None, typer.Option("--insecure/--tls", help="plaintext (services run with NUMPROTECT_TLS=off)")
    ] = None,
    from_run: Annotated[
        str | None,
        typer.Option("--from-run-dir", help="the services of `make run` with this run directory (e.g. .run)"),
    ] = None,
    use: Annotated[bool, typer.Option("--use", help="also make it the current context")] = False,
    output: OutputOption = OutputFormat.table,
) -> None:
    """Create a context or change the settings given (others keep their values). Paths are stored absolute."""
    config = session_of(ctx).config()
    changes: dict[str, Any] = from_run_dir(from_run) if from_run is not None else {}
    given = {
        "host": host,
        "allocation": allocation,
        "binding": binding,
        "translation": translation,
        "cdr": cdr,
        "events": events,
        "ca_file": absolute(ca_file),
        "cert_file": absolute(cert_file),
        "key_file": absolute(key_file),
        "token_file": absolute(token_file),
        "token_env": token_env,
        "server_name": server_name,
        "insecure": insecure,
    }
    changes.update({key: value for key, value in given.items() if value is not None})
    context = (config.find(name) or Context(name)).updated(changes)
    config.put(context)
    if use or not config.current:
        config.current = name
    config.save()
    printer = Printer(output)
    if printer.json:
        printer.line(json.dumps(_described(context, config.current), indent=2))
    else:
        printer.line(f"context {name!r} saved in {config.path}" + (" (current)" if config.current == name else ""))


@app.command("use-context")
def use_context(ctx: typer.Context, name: str, output: OutputOption = OutputFormat.table) -> None:
    """Make NAME the current context."""
    config = session_of(ctx).config()
    config.get(name)
    config.current = name
    config.save()
    printer = Printer(output)
    printer.line(json.dumps({"current_context": name}) if printer.json else f"current context: {name}")


@app.command("current-context")
def current_context(ctx: typer.Context, output: OutputOption = OutputFormat.table) -> None:
    """Print the context commands use (--context or $NUMPROTECT_CONTEXT win over the file's current one)."""
    session = session_of(ctx)
    context = session.config().selected(session.context_name)
    printer = Printer(output)
    printer.line(json.dumps({"current_context": context.name}) if printer.json else context.name)


@app.command("get-contexts")
def get_contexts(ctx: typer.Context, output: OutputOption = OutputFormat.table) -> None:
    """List the contexts (the token's file or variable is shown, never the token)."""
    session = session_of(ctx)
    config = session.config()
    current = session.context_name or config.current
    printer = Printer(output)
    if printer.json:
        printer.line(json.dumps([_described(context, current) for context in config.contexts], indent=2))
        return
    printer.table(
        ["CURRENT", "NAME", "ADDRESSES", "CA", "CLIENT CERT", "TOKEN FROM"],
        (
            [
                "*" if context.name == current else "",
                context.name,
                _addresses(context),
                "plaintext" if context.insecure else context.ca_file,
                context.cert_file,
                _token_source(context),
            ]
            for context in config.contexts
        ),
    )


@app.command("delete-context")
def delete_context(ctx: typer.Context, name: str, output: OutputOption = OutputFormat.table) -> None:
    """Remove a context (no context is current afterwards if it was)."""
    config = session_of(ctx).config()
    config.remove(name)
    config.save()
    printer = Printer(output)
    printer.line(json.dumps({"deleted": name}) if printer.json else f"context {name!r} deleted")
