"""A process's own credential on its calls to other numprotect services (binding → allocation).

NUMPROTECT_SERVICE_TOKEN_FILE names a file holding this service's API token (a ROLE_SERVICE key, e.g. id "binding");
it is read once at start-up, checked to have a token's shape, and sent as `authorization: Bearer <token>` on every
call of every channel the runtime opens to a peer. Rotating it: mint the new key, rewrite the file, restart the
replicas, then revoke the old key (several keys may be active at once). In mTLS mode the workload certificate names
the service already (spiffe://numprotect/service/<name>) and the token is optional. The token is never logged:
the repr hides it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from numprotect.core.identity.api_keys import split_token
from numprotect.core.settings import Env, SettingsError

SERVICE_TOKEN_FILE = "NUMPROTECT_SERVICE_TOKEN_FILE"


class ServiceToken:
    """The bearer token this process presents to its peers."""

    __slots__ = ("_metadata", "_token")

    def __init__(self, token: str) -> None:
        if split_token(token) is None:
            raise ValueError("not an API token")
        self._token = token
        self._metadata = ("authorization", f"Bearer {token}")

    def __repr__(self) -> str:
        return "ServiceToken(<secret>)"

    @classmethod
    def from_env(cls, env: Env) -> ServiceToken | None:
        """The token of NUMPROTECT_SERVICE_TOKEN_FILE, or None when unset (SettingsError naming the variable and the
        file, never the content, when the file cannot be read or holds no token)."""
        path = env.raw(SERVICE_TOKEN_FILE)
        if path is None:
            return None
        try:
            raw = Path(path).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not text"
            raise SettingsError(f"{SERVICE_TOKEN_FILE}: cannot read {path} ({reason})") from None
        try:
            return cls(raw)
        except ValueError:
            raise SettingsError(
                f"{SERVICE_TOKEN_FILE}: {path} must hold one API token (npk_<key id>_<secret>) and nothing else"
            ) from None

    def call_credentials(self) -> grpc.CallCredentials:
        """For a TLS channel: grpc composes them with the channel's credentials."""
        return grpc.access_token_call_credentials(self._token)

    def interceptor(self) -> BearerInterceptor:
        """For a plaintext channel (NUMPROTECT_TLS=off), where grpc refuses call credentials."""
        return BearerInterceptor(self._metadata)


def _with_header(details: grpc.aio.ClientCallDetails, header: tuple[str, str]) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add(*header)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class BearerInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """Adds one metadata entry (the bearer header) to every call of a grpc.aio channel, whatever its kind."""

    def __init__(self, header: tuple[str, str]) -> None:
        self._header = header

    def __repr__(self) -> str:
        return "BearerInterceptor(<secret>)"

    async def _proceed(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(_with_header(details, self._header), request)

    # Every kind of call the same way (`request` is the request iterator of a client-streaming call).
    async def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await self._proceed(continuation, details, request)

    async def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await self._proceed(continuation, details, request)

    async def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return await self._proceed(continuation, details, requests)

    async def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return await self._proceed(continuation, details, requests)
