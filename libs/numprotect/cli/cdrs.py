"""`numprotect cdrs list|watch`: call detail records (cdr service)."""

from __future__ import annotations

from typing import Annotated

import typer

from numprotect.cdr.v1 import cdr_pb2 as pb
from numprotect.cdr.v1.cdr_pb2_grpc import CdrServiceStub
from numprotect.cli.connection import call_pages, session_of
from numprotect.cli.options import AllPages, PageSize, PageToken, Since, Tenant, Until
from numprotect.cli.output import OutputFormat, OutputOption, Printer, cell
from numprotect.cli.streams import follow
from numprotect.cli.times import timestamp

app = typer.Typer(help="Call detail records: a listing, or follow them live.")

LIST_COLUMNS = (
    "call_id",
    "call_time",
    "call_type",
    "calling_number",
    "called_number",
    "target_number",
    "billable_seconds",
    "binding_id",
    "binding_match",
)
# `watch` prints a row per record as it arrives (a table cannot be printed before it is complete): fixed widths.
WATCH_COLUMNS = (("call_time", 21), ("call_id", 24), ("call_type", 18), ("called_number", 16), ("binding_id", 26))
Unmatched = Annotated[bool, typer.Option(help="operator: the records that matched no binding (no --tenant)")]


@app.command("list")
def list_cdrs(
    ctx: typer.Context,
    tenant: Tenant = "",
    binding_id: Annotated[str, typer.Option(help="only this binding's records")] = "",
    out_order_id: Annotated[str, typer.Option(help="only this order's records")] = "",
    since: Since = None,
    until: Until = None,
    unmatched: Unmatched = False,
    page_size: PageSize = 0,
    page_token: PageToken = "",
    all_pages: AllPages = False,
    output: OutputOption = OutputFormat.table,
) -> None:
    """A tenant's records (by binding, order, time range), or the unmatched ones."""
    request = pb.ListCdrsRequest(
        tenant_id=tenant,
        binding_id=binding_id,
        out_order_id=out_order_id,
        unmatched=unmatched,
        page_size=page_size,
        page_token=page_token,
    )
    if since is not None:
        request.start_time.CopyFrom(timestamp(since, "--since"))
    if until is not None:
        request.end_time.CopyFrom(timestamp(until, "--until"))
    response = call_pages(ctx, CdrServiceStub, "cdr", "ListCdrs", request, "records", all_pages=all_pages)
    Printer(output).listing(response, "records", LIST_COLUMNS)


@app.command("watch")
def watch(
    ctx: typer.Context,
    tenant: Tenant = "",
    cursor: Annotated[
        str, typer.Option(help='resume after this cursor; "0": from the oldest kept; default: new ones')
    ] = "",
    unmatched: Unmatched = False,
    limit: Annotated[int, typer.Option(min=0, help="stop after this many records (0: never)")] = 0,
    duration: Annotated[float, typer.Option(min=0, help="stop after this many seconds (0: never)")] = 0.0,
    output: OutputOption = OutputFormat.table,
) -> None:
    """Follow records as they are stored, until Ctrl-C (or --limit/--duration). Prints each record with its
    cursor (json: one WatchCdrsResponse per line); on stopping, the cursor to resume from goes to stderr."""
    request = pb.WatchCdrsRequest(tenant_id=tenant, cursor=cursor, unmatched=unmatched)
    with session_of(ctx).connect() as connection:
        follow(
            connection,
            connection.stub(CdrServiceStub, "cdr").WatchCdrs,
            request,
            Printer(output),
            columns=WATCH_COLUMNS,
            cells=lambda response: [cell(response.record, name) for name, _ in WATCH_COLUMNS],
            cursor=cursor,
            noun="record",
            limit=limit,
            duration=duration,
        )
