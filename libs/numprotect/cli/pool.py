"""`numprotect pool stats`: a tenant's pools per city, numbers by state and the days of stock left at the current
allocation rate (AllocationService.GetPoolStats; docs/allocation.md, "Pool stats")."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from numprotect.allocation.v1 import allocation_pb2 as pb
from numprotect.allocation.v1.allocation_pb2_grpc import AllocationServiceStub
from numprotect.cli.connection import call
from numprotect.cli.options import Tenant
from numprotect.cli.output import OutputFormat, OutputOption, Printer, to_dict

app = typer.Typer(help="Number pools: counts by state and days of stock left, per city.")

COLUMNS = ("TENANT", "CITY", "TOTAL", "AVAILABLE", "IN_USE", "LOCKED", "COOLING", "NET_TAKEN/DAY", "DAYS_LEFT")


def days_of_stock_left(available: int, net_taken_per_day: float) -> float | None:
    """Days until the free numbers run out at the current rate; None when allocations are not shrinking the free
    set (a net take of 0 or less over the rate window): at that rate the stock does not run out."""
    if net_taken_per_day <= 0:
        return None
    return available / net_taken_per_day


def _row(tenant: str, city: str, figures: pb.GetPoolStatsResponse | pb.CityPoolStats) -> list[str]:
    days = days_of_stock_left(figures.available, figures.net_taken_per_day)
    return [
        tenant,
        city,
        str(figures.total),
        str(figures.available),
        str(figures.in_use),
        str(figures.locked),
        str(figures.cooling),
        f"{figures.net_taken_per_day:.1f}",
        "-" if days is None else f"{days:.1f}",
    ]


@app.command("stats")
def stats(
    ctx: typer.Context,
    tenant: Tenant = "",
    city: Annotated[str, typer.Option("--city", help="one city (area code, e.g. 010); default: every city")] = "",
    output: OutputOption = OutputFormat.table,
) -> None:
    """Per city: numbers by state, the allocation rate (net numbers taken from the free set per day, over today
    and the 6 days before) and the days of stock left at that rate (AVAILABLE / rate; '-' or null when the rate
    is 0 or below: allocations are not shrinking the free set)."""
    request = pb.GetPoolStatsRequest(tenant_id=tenant, city_code=city)
    response: pb.GetPoolStatsResponse = call(ctx, AllocationServiceStub, "allocation", "GetPoolStats", request)
    printer = Printer(output)
    if printer.json:
        document: dict[str, Any] = {"tenant_id": tenant, **to_dict(response)}
        document["days_of_stock_left"] = days_of_stock_left(response.available, response.net_taken_per_day)
        for entry, figures in zip(document.get("cities", []), response.cities, strict=True):
            entry["days_of_stock_left"] = days_of_stock_left(figures.available, figures.net_taken_per_day)
        printer.line(json.dumps(document, indent=2))
        return
    shown = tenant or "(own)"
    rows = [_row(shown, c.city_code, c) for c in response.cities]
    if len(response.cities) > 1:
        rows.append(_row(shown, "all", response))
    window = response.rate_window.seconds / 86_400
    printer.table(COLUMNS, rows, title=f"pool stats (rate over the last {window:.1f} days)")
