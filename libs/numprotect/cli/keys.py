"""`numprotect keys create|list|revoke`: API keys (AdminService, on allocation's port; operator only)."""

from __future__ import annotations

import os
import re
import time
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Annotated

import typer
from google.protobuf import timestamp_pb2

from numprotect.admin.v1 import admin_pb2
from numprotect.admin.v1.admin_pb2_grpc import AdminServiceStub
from numprotect.cli.connection import call, call_pages
from numprotect.cli.failures import EXIT_CONFIG, EXIT_USAGE, CliError
from numprotect.cli.options import AllPages, PageSize, PageToken
from numprotect.cli.output import OutputFormat, OutputOption, Printer, note

app = typer.Typer(help="API keys: mint (the token is shown once), list, revoke. Operator only.")

KEY_COLUMNS = ("key_id", "role", "tenant_id", "carrier_id", "service", "description", "create_time", "revoke_time")
_UNITS = MappingProxyType({"s": 1, "m": 60, "h": 3600, "d": 86400})


class RoleName(StrEnum):
    operator = "operator"
    tenant = "tenant"
    carrier = "carrier"
    regulator = "regulator"
    service = "service"


def role_enum(role: RoleName) -> admin_pb2.Role.ValueType:
    return admin_pb2.Role.Value(f"ROLE_{role.value.upper()}")


def seconds_of(text: str, option: str) -> int:
    """ "90d", "12h", "30m", "45s" or plain seconds."""
    match = re.fullmatch(r"(\d+)([smhd]?)", text.strip())
    if match is None:
        raise CliError(f"{option}: {text!r} is not a duration like 90d, 12h, 30m or 45s", EXIT_USAGE)
    return int(match.group(1)) * _UNITS[match.group(2) or "s"]


def _writable_new_file(path: Path) -> None:
    """Refuses, before the key is minted, a --token-file that exists or whose folder cannot be written."""
    if path.exists():
        raise CliError(f"--token-file {path}: exists (a token file is never overwritten)", EXIT_USAGE)
    folder = path.parent if str(path.parent) else Path(".")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CliError(f"--token-file {path}: cannot create a file in {folder}", EXIT_USAGE)


def _write_token(path: Path, token: str, key_id: str) -> None:
    """The token into a new file of mode 600. Should that still fail, the key exists with a token nobody has:
    the line says which key to revoke (the token itself is never printed here)."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(token + "\n")
    except OSError as exc:
        raise CliError(
            f"--token-file {path}: {exc.strerror}; key {key_id} was minted and its token is lost: "
            f"numprotect keys revoke {key_id}",
            EXIT_CONFIG,
        ) from exc


@app.command("create")
def create(
    ctx: typer.Context,
    role: Annotated[RoleName, typer.Option(help="what the key may do (docs/security.md)")],
    tenant: Annotated[str, typer.Option("--tenant", help="tenant_id (role tenant)")] = "",
    carrier: Annotated[str, typer.Option("--carrier", help="carrier_id (role carrier)")] = "",
    service: Annotated[str, typer.Option("--service", help="service name (role service), e.g. binding")] = "",
    description: Annotated[str, typer.Option(help="what the key is for (at most 256 characters)")] = "",
    expires_in: Annotated[str | None, typer.Option(help="lifetime, e.g. 90d or 12h (default: never expires)")] = None,
    token_file: Annotated[
        Path | None, typer.Option(help="write the token to this new file (mode 600) instead of printing it")
    ] = None,
    output: OutputOption = OutputFormat.table,
) -> None:
    """Mint a key. Its token is shown only now: printed, or written to --token-file and not printed."""
    request = admin_pb2.CreateApiKeyRequest(
        role=role_enum(role), tenant_id=tenant, carrier_id=carrier, service=service, description=description
    )
    if expires_in is not None:
        request.expire_time.CopyFrom(
            timestamp_pb2.Timestamp(seconds=int(time.time()) + seconds_of(expires_in, "--expires-in"))
        )
    if token_file is not None:
        _writable_new_file(token_file)
    response = call(ctx, AdminServiceStub, "admin", "CreateApiKey", request)
    if token_file is not None:
        _write_token(token_file, response.token, response.key.key_id)
        response.ClearField("token")
        note(f"token written to {token_file}")
    printer = Printer(output)
    if printer.json:
        printer.message_json(response)
        return
    printer.fields(response.key, title="API key")
    if response.token:
        printer.line(f"token (shown once): {response.token}")


@app.command("list")
def list_keys(
    ctx: typer.Context,
    role: Annotated[RoleName | None, typer.Option(help="only this role")] = None,
    tenant: Annotated[str, typer.Option("--tenant", help="only this tenant's keys")] = "",
    carrier: Annotated[str, typer.Option("--carrier", help="only this carrier's keys")] = "",
    show_revoked: Annotated[bool, typer.Option(help="include revoked keys")] = False,
    page_size: PageSize = 0,
    page_token: PageToken = "",
    all_pages: AllPages = False,
    output: OutputOption = OutputFormat.table,
) -> None:
    """Keys, newest first (never a token)."""
    request = admin_pb2.ListApiKeysRequest(
        page_size=page_size,
        page_token=page_token,
        role=role_enum(role) if role is not None else admin_pb2.ROLE_UNSPECIFIED,
        tenant_id=tenant,
        carrier_id=carrier,
        show_revoked=show_revoked,
    )
    response = call_pages(ctx, AdminServiceStub, "admin", "ListApiKeys", request, "keys", all_pages=all_pages)
    Printer(output).listing(response, "keys", KEY_COLUMNS)


@app.command("revoke")
def revoke(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(help="the key's id (keys list)")],
    output: OutputOption = OutputFormat.table,
) -> None:
    """Revoke a key: every process refuses it within 3 s, also on open streams. Idempotent."""
    response = call(ctx, AdminServiceStub, "admin", "RevokeApiKey", admin_pb2.RevokeApiKeyRequest(key_id=key_id))
    Printer(output).show(response, table=response.key, title="revoked")
