"""`numprotect endpoints create|get|list|update|rotate-secret|delete`: tenants' webhook endpoints (events service;
a tenant for its own, the operator for any tenant with --tenant)."""

from __future__ import annotations

from typing import Annotated

import typer
from google.protobuf import duration_pb2, field_mask_pb2

from numprotect.cli.connection import call, call_pages
from numprotect.cli.keys import seconds_of
from numprotect.cli.options import AllPages, PageSize, PageToken, Tenant
from numprotect.cli.output import OutputFormat, OutputOption, Printer
from numprotect.events.v1 import events_pb2 as pb
from numprotect.events.v1.events_pb2_grpc import EventServiceStub

app = typer.Typer(help="Webhook endpoints: where a tenant's events are POSTed, signed (docs/events.md).")

LIST_COLUMNS = ("endpoint_id", "url", "event_types", "state", "batch_size", "max_concurrency", "description")
EndpointId = Annotated[str, typer.Argument(help="the endpoint's id (ep_...)")]
EventTypes = Annotated[
    list[str] | None,
    typer.Option("--event-type", help="an event type to deliver (repeat it; none: every type), e.g. binding.created"),
]
BatchSize = Annotated[int | None, typer.Option(help="most events in one request (a JSON array above 1)")]
MaxConcurrency = Annotated[int | None, typer.Option(help="most requests in flight to it (0: the service default)")]


def _show_with_secret(printer: Printer, response: pb.CreateEndpointResponse | pb.RotateEndpointSecretResponse) -> None:
    """The endpoint; its signing secret, which only this answer carries, printed once after the table."""
    if printer.json:
        printer.message_json(response)
        return
    printer.fields(response.endpoint, title="endpoint", skip=("secret",))
    printer.line(f"signing secret (shown once): {response.endpoint.secret}")


@app.command("create")
def create(
    ctx: typer.Context,
    url: Annotated[str, typer.Option(help="the receiver's URL (https://; http:// where the service allows it)")],
    tenant: Tenant = "",
    event_types: EventTypes = None,
    description: Annotated[str, typer.Option(help="what the endpoint is for")] = "",
    batch_size: BatchSize = None,
    max_concurrency: MaxConcurrency = None,
    output: OutputOption = OutputFormat.table,
) -> None:
    """Register an endpoint. Its signing secret (whsec_...) is shown only now: keep it for verifying."""
    request = pb.CreateEndpointRequest(
        tenant_id=tenant,
        url=url,
        event_types=event_types or [],
        description=description,
        batch_size=batch_size or 0,
        max_concurrency=max_concurrency or 0,
    )
    _show_with_secret(Printer(output), call(ctx, EventServiceStub, "events", "CreateEndpoint", request))


@app.command("get")
def get(
    ctx: typer.Context, endpoint_id: EndpointId, tenant: Tenant = "", output: OutputOption = OutputFormat.table
) -> None:
    """One endpoint (never its secret)."""
    request = pb.GetEndpointRequest(tenant_id=tenant, endpoint_id=endpoint_id)
    response = call(ctx, EventServiceStub, "events", "GetEndpoint", request)
    Printer(output).show(response, table=response.endpoint)


@app.command("list")
def list_endpoints(
    ctx: typer.Context,
    tenant: Tenant = "",
    page_size: PageSize = 0,
    page_token: PageToken = "",
    all_pages: AllPages = False,
    output: OutputOption = OutputFormat.table,
) -> None:
    """A tenant's endpoints."""
    request = pb.ListEndpointsRequest(tenant_id=tenant, page_size=page_size, page_token=page_token)
    response = call_pages(ctx, EventServiceStub, "events", "ListEndpoints", request, "endpoints", all_pages=all_pages)
    Printer(output).listing(response, "endpoints", LIST_COLUMNS)


@app.command("update")
def update(
    ctx: typer.Context,
    endpoint_id: EndpointId,
    tenant: Tenant = "",
    url: Annotated[str | None, typer.Option(help="a new receiver URL")] = None,
    event_types: EventTypes = None,
    all_types: Annotated[bool, typer.Option("--all-types", help="deliver every event type again")] = False,
    description: Annotated[str | None, typer.Option(help="a new description")] = None,
    enabled: Annotated[
        bool | None,
        typer.Option("--enable/--disable", help="deliver again (also after a 410 Gone) / stop delivering"),
    ] = None,
    batch_size: BatchSize = None,
    max_concurrency: MaxConcurrency = None,
    output: OutputOption = OutputFormat.table,
) -> None:
    """Change what the options give (update_mask names exactly those); the rest stays."""
    if event_types and all_types:
        raise typer.BadParameter("give --all-types or --event-type, not both")
    endpoint = pb.Endpoint(tenant_id=tenant, endpoint_id=endpoint_id)
    paths: list[str] = []
    if url is not None:
        endpoint.url = url
        paths.append("url")
    if event_types or all_types:
        endpoint.event_types.extend(event_types or [])
        paths.append("event_types")
    if description is not None:
        endpoint.description = description
        paths.append("description")
    if enabled is not None:
        endpoint.state = pb.ENDPOINT_STATE_ENABLED if enabled else pb.ENDPOINT_STATE_DISABLED
        paths.append("state")
    if batch_size is not None:
        endpoint.batch_size = batch_size
        paths.append("batch_size")
    if max_concurrency is not None:
        endpoint.max_concurrency = max_concurrency
        paths.append("max_concurrency")
    if not paths:
        raise typer.BadParameter(
            "give at least one of --url, --event-type/--all-types, --description, --enable/--disable, --batch-size, "
            "--max-concurrency"
        )
    request = pb.UpdateEndpointRequest(endpoint=endpoint, update_mask=field_mask_pb2.FieldMask(paths=paths))
    response = call(ctx, EventServiceStub, "events", "UpdateEndpoint", request)
    Printer(output).show(response, table=response.endpoint)


@app.command("rotate-secret")
def rotate_secret(
    ctx: typer.Context,
    endpoint_id: EndpointId,
    tenant: Tenant = "",
    grace: Annotated[
        str | None,
        typer.Option(help="how long the old secret keeps signing, e.g. 24h, 30m, 0 (default: the service's, 24 h)"),
    ] = None,
    output: OutputOption = OutputFormat.table,
) -> None:
    """A new signing secret, shown once; both sign every webhook until the grace period ends."""
    request = pb.RotateEndpointSecretRequest(tenant_id=tenant, endpoint_id=endpoint_id)
    if grace is not None:
        request.grace_period.CopyFrom(duration_pb2.Duration(seconds=seconds_of(grace, "--grace")))
    _show_with_secret(Printer(output), call(ctx, EventServiceStub, "events", "RotateEndpointSecret", request))


@app.command("delete")
def delete(
    ctx: typer.Context, endpoint_id: EndpointId, tenant: Tenant = "", output: OutputOption = OutputFormat.table
) -> None:
    """Delete an endpoint with its queue, deliveries and dead letters."""
    request = pb.DeleteEndpointRequest(tenant_id=tenant, endpoint_id=endpoint_id)
    response = call(ctx, EventServiceStub, "events", "DeleteEndpoint", request)
    printer = Printer(output)
    if printer.json:
        printer.message_json(response)
    else:
        printer.line(f"endpoint {endpoint_id} deleted")
