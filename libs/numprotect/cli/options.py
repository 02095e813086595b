"""Options several commands share (listing pages, time ranges, the tenant)."""

from __future__ import annotations

from typing import Annotated

import typer

PageSize = Annotated[int, typer.Option(help="items per page, up to 1000 (0: the server's default, 100)")]
PageToken = Annotated[str, typer.Option(help="continue a listing (its next_page_token)")]
AllPages = Annotated[bool, typer.Option("--all", help="follow next_page_token to the end")]
Since = Annotated[str | None, typer.Option(help="from this time (RFC 3339, e.g. 2026-11-30T21:00:00Z)")]
Until = Annotated[str | None, typer.Option(help="before this time (RFC 3339)")]
Tenant = Annotated[str, typer.Option("--tenant", help="tenant_id (a tenant key may leave it out: its own)")]
Reason = Annotated[str, typer.Option(help="a case reference (required of a regulator; audited)")]
