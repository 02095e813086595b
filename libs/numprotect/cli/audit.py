"""`numprotect audit list|verify`: the audit trail (AdminService, on allocation's port)."""

from __future__ import annotations

from typing import Annotated

import typer

from numprotect.admin.v1 import admin_pb2
from numprotect.admin.v1.admin_pb2_grpc import AdminServiceStub
from numprotect.cli.connection import call, call_pages
from numprotect.cli.failures import EXIT_CHECK_FAILED, PROG
from numprotect.cli.output import OutputFormat, OutputOption, Printer, note
from numprotect.cli.times import timestamp

app = typer.Typer(help="The audit trail: who called what, and whether the chain is intact.")

EVENT_COLUMNS = ("event_id", "time", "principal", "method", "target", "reason", "outcome", "peer")


@app.command("list")
def list_events(
    ctx: typer.Context,
    principal: Annotated[str, typer.Option(help='only this principal, e.g. "tenant:acme"')] = "",
    method: Annotated[
        str, typer.Option(help="only this full method, e.g. /numprotect.binding.v1.BindingService/...")
    ] = "",
    since: Annotated[str | None, typer.Option(help="from this time (RFC 3339)")] = None,
    until: Annotated[str | None, typer.Option(help="before this time (RFC 3339)")] = None,
    page_size: Annotated[int, typer.Option(help="events per page, up to 1000 (0: the server's default, 100)")] = 0,
    page_token: Annotated[str, typer.Option(help="continue a listing (its next_page_token)")] = "",
    all_pages: Annotated[bool, typer.Option("--all", help="follow next_page_token to the end")] = False,
    output: OutputOption = OutputFormat.table,
) -> None:
    """Audit events, newest first."""
    request = admin_pb2.ListAuditEventsRequest(
        principal=principal, method=method, page_size=page_size, page_token=page_token
    )
    if since is not None:
        request.start_time.CopyFrom(timestamp(since, "--since"))
    if until is not None:
        request.end_time.CopyFrom(timestamp(until, "--until"))
    response = call_pages(ctx, AdminServiceStub, "admin", "ListAuditEvents", request, "events", all_pages=all_pages)
    Printer(output).listing(response, "events", EVENT_COLUMNS)


@app.command("verify")
def verify(ctx: typer.Context, output: OutputOption = OutputFormat.table) -> None:
    """Recompute the audit chain. Exit status 20 when an event was edited, removed or inserted."""
    response = call(ctx, AdminServiceStub, "admin", "VerifyAuditChain", admin_pb2.VerifyAuditChainRequest())
    Printer(output).show(response, title="audit chain")
    if not response.ok:
        note(f"{PROG}: audit chain broken at {response.first_bad_event_id}: {response.problem}")
        raise typer.Exit(EXIT_CHECK_FAILED)
