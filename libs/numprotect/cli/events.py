"""`numprotect events deliveries|dead-letters|redrive|replay|watch`: what happened to a tenant's webhooks, and its
events as a stream (events service; a tenant for its own, the operator for any tenant with --tenant)."""

from __future__ import annotations

from typing import Annotated

import typer

from numprotect.cli.connection import call, call_pages, session_of
from numprotect.cli.options import AllPages, PageSize, PageToken, Tenant
from numprotect.cli.output import OutputFormat, OutputOption, Printer, cell
from numprotect.cli.streams import follow
from numprotect.cli.times import timestamp
from numprotect.events.v1 import events_pb2 as pb
from numprotect.events.v1.events_pb2_grpc import EventServiceStub

app = typer.Typer(help="Webhook deliveries and dead letters, redrive and replay, and a live stream of events.")

DELIVERY_COLUMNS = (
    "attempt_time",
    "event_id",
    "event_type",
    "attempt",
    "succeeded",
    "http_status",
    "latency",
    "error",
)
DEAD_LETTER_COLUMNS = ("event_id", "event_type", "event_time", "dead_time", "attempts", "last_error")
# `watch` prints a row per event as it arrives: fixed widths.
WATCH_COLUMNS = (("time", 21), ("event_id", 30), ("type", 18))
EndpointId = Annotated[str, typer.Argument(help="the endpoint's id (ep_...; numprotect endpoints list)")]


def _count(printer: Printer, response: pb.RedriveDeadLettersResponse | pb.ReplayEventsResponse, text: str) -> None:
    if printer.json:
        printer.message_json(response)
    else:
        printer.line(text)


@app.command("deliveries")
def deliveries(
    ctx: typer.Context,
    endpoint_id: EndpointId,
    tenant: Tenant = "",
    event_id: Annotated[str, typer.Option(help="only the attempts of this event (evt_...)")] = "",
    page_size: PageSize = 0,
    page_token: PageToken = "",
    all_pages: AllPages = False,
    output: OutputOption = OutputFormat.table,
) -> None:
    """An endpoint's delivery attempts, newest first: time, HTTP status, latency, error."""
    request = pb.ListDeliveriesRequest(
        tenant_id=tenant, endpoint_id=endpoint_id, event_id=event_id, page_size=page_size, page_token=page_token
    )
    response = call_pages(ctx, EventServiceStub, "events", "ListDeliveries", request, "deliveries", all_pages=all_pages)
    Printer(output).listing(response, "deliveries", DELIVERY_COLUMNS)


@app.command("dead-letters")
def dead_letters(
    ctx: typer.Context,
    endpoint_id: EndpointId,
    tenant: Tenant = "",
    page_size: PageSize = 0,
    page_token: PageToken = "",
    all_pages: AllPages = False,
    output: OutputOption = OutputFormat.table,
) -> None:
    """Events whose every attempt failed, oldest first, with the last error."""
    request = pb.ListDeadLettersRequest(
        tenant_id=tenant, endpoint_id=endpoint_id, page_size=page_size, page_token=page_token
    )
    response = call_pages(
        ctx, EventServiceStub, "events", "ListDeadLetters", request, "dead_letters", all_pages=all_pages
    )
    Printer(output).listing(response, "dead_letters", DEAD_LETTER_COLUMNS)


@app.command("redrive")
def redrive(
    ctx: typer.Context,
    endpoint_id: EndpointId,
    tenant: Tenant = "",
    event_ids: Annotated[
        list[str] | None, typer.Option("--event-id", help="only this dead letter (repeat it; none: every one)")
    ] = None,
    output: OutputOption = OutputFormat.table,
) -> None:
    """Put dead letters back on the endpoint's queue, with a fresh retry schedule (the same event ids)."""
    request = pb.RedriveDeadLettersRequest(tenant_id=tenant, endpoint_id=endpoint_id, event_ids=event_ids or [])
    response = call(ctx, EventServiceStub, "events", "RedriveDeadLetters", request)
    _count(Printer(output), response, f"{response.events_requeued} event(s) requeued to {endpoint_id}")


@app.command("replay")
def replay(
    ctx: typer.Context,
    endpoint_id: EndpointId,
    since: Annotated[str, typer.Option(help="from this event time (RFC 3339, e.g. 2026-11-30T21:00:00Z)")],
    until: Annotated[str, typer.Option(help="before this event time (RFC 3339, or now)")] = "now",
    tenant: Tenant = "",
    output: OutputOption = OutputFormat.table,
) -> None:
    """Send the endpoint again the events of [--since, --until) it subscribes to: the same events, the same ids."""
    request = pb.ReplayEventsRequest(
        tenant_id=tenant,
        endpoint_id=endpoint_id,
        start_time=timestamp(since, "--since"),
        end_time=timestamp(until, "--until"),
    )
    response = call(ctx, EventServiceStub, "events", "ReplayEvents", request)
    _count(Printer(output), response, f"{response.events_queued} event(s) queued to {endpoint_id}")


@app.command("watch")
def watch(
    ctx: typer.Context,
    tenant: Tenant = "",
    event_types: Annotated[
        list[str] | None, typer.Option("--event-type", help="only this type (repeat it; none: every type)")
    ] = None,
    cursor: Annotated[
        str, typer.Option(help='resume after this cursor; "0": from the oldest kept; default: new ones')
    ] = "",
    limit: Annotated[int, typer.Option(min=0, help="stop after this many events (0: never)")] = 0,
    duration: Annotated[float, typer.Option(min=0, help="stop after this many seconds (0: never)")] = 0.0,
    output: OutputOption = OutputFormat.table,
) -> None:
    """Follow a tenant's events as they happen (WatchEvents), until Ctrl-C (or --limit/--duration): a row per event
    with its cursor (json: one WatchEventsResponse per line, the webhook body in event.payload_json); on stopping,
    the cursor to resume from goes to stderr."""
    request = pb.WatchEventsRequest(tenant_id=tenant, event_types=event_types or [], cursor=cursor)
    with session_of(ctx).connect() as connection:
        follow(
            connection,
            connection.stub(EventServiceStub, "events").WatchEvents,
            request,
            Printer(output),
            columns=WATCH_COLUMNS,
            cells=lambda response: [cell(response.event, name) for name, _ in WATCH_COLUMNS],
            cursor=cursor,
            noun="event",
            limit=limit,
            duration=duration,
        )
