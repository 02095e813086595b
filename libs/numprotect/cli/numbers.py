"""`numprotect numbers get|lock|unlock|release|history`: one 700 number (allocation service)."""

from __future__ import annotations

from typing import Annotated

import typer
from google.protobuf.message import Message

from numprotect.allocation.v1 import allocation_pb2 as pb
from numprotect.allocation.v1.allocation_pb2_grpc import AllocationServiceStub
from numprotect.cli.connection import call, call_pages
from numprotect.cli.options import AllPages, PageSize, PageToken, Reason
from numprotect.cli.output import OutputFormat, OutputOption, Printer

app = typer.Typer(help="A 700 number: its state, locks, release into cool-down, its history.")

Number = Annotated[str, typer.Argument(help="the virtual number, e.g. 700100000001234")]
Actor = Annotated[str, typer.Option(help="who acts (recorded in the number's history)")]
HISTORY_COLUMNS = ("time", "kind", "actor", "reason", "tenant_id", "binding_id", "detail")


def _number_call(ctx: typer.Context, method: str, request: Message, output: OutputFormat) -> None:
    response = call(ctx, AllocationServiceStub, "allocation", method, request)
    Printer(output).show(response, table=response.number)


@app.command("get")
def get(ctx: typer.Context, number: Number, output: OutputOption = OutputFormat.table) -> None:
    """The number's tenant, city, state, active bindings, lock reason, cool-down end."""
    _number_call(ctx, "GetNumber", pb.GetNumberRequest(virtual_number=number), output)


@app.command("lock")
def lock(
    ctx: typer.Context,
    number: Number,
    reason: Annotated[str, typer.Option(help="why (required; shown by numbers get)")],
    actor: Actor = "",
    output: OutputOption = OutputFormat.table,
) -> None:
    """Lock the number: translation rejects its calls (NUMBER_LOCKED) until unlocked."""
    _number_call(ctx, "LockNumber", pb.LockNumberRequest(virtual_number=number, reason=reason, actor=actor), output)


@app.command("unlock")
def unlock(ctx: typer.Context, number: Number, actor: Actor = "", output: OutputOption = OutputFormat.table) -> None:
    """Unlock the number."""
    _number_call(ctx, "UnlockNumber", pb.UnlockNumberRequest(virtual_number=number, actor=actor), output)


@app.command("release")
def release(
    ctx: typer.Context,
    number: Number,
    reason: Annotated[str, typer.Option(help="why (recorded in the history)")] = "",
    actor: Actor = "",
    output: OutputOption = OutputFormat.table,
) -> None:
    """Release the number into its cool-down, after which it serves again."""
    request = pb.ReleaseNumberRequest(virtual_number=number, reason=reason, actor=actor)
    _number_call(ctx, "ReleaseNumber", request, output)


@app.command("history")
def history(
    ctx: typer.Context,
    number: Number,
    reason: Reason = "",
    page_size: PageSize = 0,
    page_token: PageToken = "",
    all_pages: AllPages = False,
    output: OutputOption = OutputFormat.table,
) -> None:
    """Every import, assignment, lock and release of the number: who, when, why."""
    request = pb.ListNumberHistoryRequest(
        virtual_number=number, reason=reason, page_size=page_size, page_token=page_token
    )
    response = call_pages(
        ctx, AllocationServiceStub, "allocation", "ListNumberHistory", request, "events", all_pages=all_pages
    )
    Printer(output).listing(response, "events", HISTORY_COLUMNS)
