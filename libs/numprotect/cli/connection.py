"""From the selected context to calls: one TLS channel per service address, the bearer token on every call
(`authorization: Bearer <token>`, as the services' identity layer reads it) and a deadline on every call."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import typer
from google.protobuf.message import Message

from numprotect.cli.contexts import ADMIN_SERVICE_HOST, ConfigFile, Context
from numprotect.cli.failures import CliError

DEFAULT_TIMEOUT_SECONDS = 10.0
RequestT = TypeVar("RequestT", bound=Message)
ResponseT = TypeVar("ResponseT", bound=Message)
StubT = TypeVar("StubT")


@dataclass(frozen=True)
class Session:
    """The root options of one invocation (--config, --context, --timeout), resolved lazily: `numprotect config`
    works without any context."""

    config_path: Path
    context_name: str | None
    timeout: float
    environ: Mapping[str, str]

    def config(self) -> ConfigFile:
        return ConfigFile.load(self.config_path)

    def context(self) -> Context:
        return self.config().selected(self.context_name)

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        connection = Connection(self.context(), self.timeout, self.environ)
        try:
            yield connection
        finally:
            connection.close()


def session_of(ctx: typer.Context) -> Session:
    session = ctx.find_root().obj
    if not isinstance(session, Session):  # pragma: no cover - set by the root callback before any command
        raise CliError("internal: no session")
    return session


def _read(path: str, what: str, context: Context) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"context {context.name!r}: {what} {path}: {exc.strerror}") from exc


@dataclass
class Connection:
    """Channels of one context, made on first use and closed with the connection."""

    context: Context
    timeout: float
    environ: Mapping[str, str]
    _channels: dict[str, grpc.Channel] = field(default_factory=dict)
    _metadata: tuple[tuple[str, str], ...] | None = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata: the bearer token (read once), or nothing when the context has no token."""
        if self._metadata is None:
            token = self.context.token(self.environ)
            self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        return self._metadata

    def channel(self, service: str) -> grpc.Channel:
        """The channel to `service` ("allocation", "binding", "translation", "cdr", "events", or "admin":
        allocation's)."""
        address = self.context.address(ADMIN_SERVICE_HOST if service == "admin" else service)
        if address not in self._channels:
            self._channels[address] = self._open(address)
        return self._channels[address]

    def _open(self, address: str) -> grpc.Channel:
        options: list[tuple[str, str | int]] = []
        if self.context.insecure:
            return grpc.insecure_channel(address, options=options)
        if not self.context.ca_file:
            raise CliError(f"context {self.context.name!r} has no ca-file (or set insecure for a plaintext service)")
        root = _read(self.context.ca_file, "ca-file", self.context)
        if b"-----BEGIN CERTIFICATE-----" not in root:
            # gRPC would log C-core lines and fail every call UNAVAILABLE: a configuration problem, said once.
            raise CliError(f"context {self.context.name!r}: ca-file {self.context.ca_file}: no PEM certificate in it")
        if bool(self.context.cert_file) != bool(self.context.key_file):
            raise CliError(f"context {self.context.name!r}: cert-file and key-file go together")
        if self.context.cert_file:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=root,
                private_key=_read(self.context.key_file, "key-file", self.context),
                certificate_chain=_read(self.context.cert_file, "cert-file", self.context),
            )
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates=root)
        if self.context.server_name:
            options.append(("grpc.ssl_target_name_override", self.context.server_name))
        return grpc.secure_channel(address, credentials, options=options)

    def stub(self, stub_class: Callable[[grpc.Channel], StubT], service: str) -> StubT:
        return stub_class(self.channel(service))

    def unary(self, method: Callable[..., ResponseT]) -> Callable[[Message], ResponseT]:
        """`method` (a stub's) with this connection's deadline and token on each call."""

        def call(request: Message) -> ResponseT:
            return method(request, timeout=self.timeout, metadata=self.metadata)

        return call

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()


def paged(call: Callable[[RequestT], ResponseT], request: RequestT, items: str, *, all_pages: bool) -> ResponseT:
    """One page of a listing, or with `all_pages` every page merged into one response (next_page_token empty):
    `request.page_token` follows each response's next_page_token."""
    response = call(request)
    if not all_pages:
        return response
    merged = type(response)()
    merged.CopyFrom(response)
    while getattr(response, "next_page_token", ""):
        request.page_token = response.next_page_token  # type: ignore[attr-defined]
        response = call(request)
        getattr(merged, items).extend(getattr(response, items))
    merged.next_page_token = ""  # type: ignore[attr-defined]
    return merged


def call(
    ctx: typer.Context, stub_class: Callable[[grpc.Channel], Any], service: str, method: str, request: Message
) -> Any:
    """One unary call of the selected context's `service` (a stub's `method`), with its deadline and token."""
    with session_of(ctx).connect() as connection:
        stub = connection.stub(stub_class, service)
        return connection.unary(getattr(stub, method))(request)


def call_pages(
    ctx: typer.Context,
    stub_class: Callable[[grpc.Channel], Any],
    service: str,
    method: str,
    request: Message,
    items: str,
    *,
    all_pages: bool,
) -> Any:
    """A listing call: one page, or every page merged (`paged`)."""
    with session_of(ctx).connect() as connection:
        stub = connection.stub(stub_class, service)
        return paged(connection.unary(getattr(stub, method)), request, items, all_pages=all_pages)
