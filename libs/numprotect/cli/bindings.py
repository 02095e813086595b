"""`numprotect bindings get|list|trace`: bindings (binding service)."""

from __future__ import annotations

from typing import Annotated

import typer

from numprotect.binding.v1 import binding_pb2 as pb
from numprotect.binding.v1.binding_pb2_grpc import BindingServiceStub
from numprotect.cli.connection import call, call_pages
from numprotect.cli.options import AllPages, PageSize, PageToken, Reason, Tenant
from numprotect.cli.output import OutputFormat, OutputOption, Printer
from numprotect.cli.times import timestamp

app = typer.Typer(help="Bindings: one by id, a tenant's listing, who had a number at a moment.")

LIST_COLUMNS = (
    "binding_id",
    "out_order_id",
    "mode",
    "virtual_number",
    "extension",
    "party_a",
    "party_b",
    "city_code",
    "state",
    "expire_time",
)
HISTORY_COLUMNS = ("time", "kind", "changed_fields", "party_b", "expire_time")


@app.command("get")
def get(
    ctx: typer.Context,
    binding_id: Annotated[str, typer.Argument(help="the binding's id")],
    tenant: Tenant = "",
    history: Annotated[bool, typer.Option("--history", help="also the binding's history")] = False,
    output: OutputOption = OutputFormat.table,
) -> None:
    """One binding (and its history of creates, updates, deletes and expiry, oldest first)."""
    request = pb.GetBindingRequest(binding_id=binding_id, tenant_id=tenant, include_history=history)
    response = call(ctx, BindingServiceStub, "binding", "GetBinding", request)
    printer = Printer(output)
    printer.show(response, table=response.binding)
    if history and not printer.json:
        printer.rows(response.history, HISTORY_COLUMNS, title="history")


@app.command("list")
def list_bindings(
    ctx: typer.Context,
    tenant: Tenant = "",
    out_order_id: Annotated[str, typer.Option(help="only this order's bindings")] = "",
    page_size: PageSize = 0,
    page_token: PageToken = "",
    all_pages: AllPages = False,
    output: OutputOption = OutputFormat.table,
) -> None:
    """A tenant's bindings."""
    request = pb.ListBindingsRequest(
        tenant_id=tenant, out_order_id=out_order_id, page_size=page_size, page_token=page_token
    )
    response = call_pages(ctx, BindingServiceStub, "binding", "ListBindings", request, "bindings", all_pages=all_pages)
    Printer(output).listing(response, "bindings", LIST_COLUMNS)


@app.command("trace")
def trace(
    ctx: typer.Context,
    number: Annotated[str, typer.Argument(help="the virtual number")],
    at: Annotated[str, typer.Option(help="the moment (RFC 3339, e.g. 2026-11-30T21:00:00Z, or now)")] = "now",
    party: Annotated[str, typer.Option(help="only the binding this real number was a party of")] = "",
    extension: Annotated[str, typer.Option(help="AXE: only the binding on this extension")] = "",
    reason: Reason = "",
    output: OutputOption = OutputFormat.table,
) -> None:
    """Which binding(s) the number served at a moment, with the parties as they were then."""
    request = pb.TraceNumberRequest(
        virtual_number=number, at=timestamp(at, "--at"), party_number=party, extension=extension, reason=reason
    )
    response = call(ctx, BindingServiceStub, "binding", "TraceNumber", request)
    Printer(output).listing(response, "bindings", LIST_COLUMNS)
