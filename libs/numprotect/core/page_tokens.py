"""One page-token format for every paged RPC: versioned, tamper-evident and bound to the query it pages.

    token = urlsafe-base64, no padding, of   version (1 byte) | cursor | tag (16 bytes)
    cursor = the listing's position fields, each as a 2-byte big-endian length and its UTF-8 bytes
    tag = HMAC-SHA256(key, version | listing name | query fields | cursor), first 16 bytes

The query fields (the tenant and every filter that shapes the listing, never page_size) are signed but not
carried: a token handed to another query, another listing, a server with another key, or edited on the way
fails the tag check and the call is INVALID_ARGUMENT on page_token. A token holds positions, not secrets;
it is signed, not encrypted. A new format takes a new version byte; a token of a version this build does not
read is refused the same way (the client starts the listing again).

The key is NUMPROTECT_PAGE_TOKEN_KEY (base64 of at least 32 bytes), read at start-up (`PageTokenKey.from_env`)
and passed to the servicers. Every replica of a service must share it: a token is usually answered by
another replica than the one that issued it. Unset, each process draws a random key and logs one warning:
its tokens then work only against that same process (fine for a single local process, not behind a balancer).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
from collections.abc import Sequence

from numprotect.core.errors import InvalidArgument
from numprotect.core.settings import Env, SettingsError

log = logging.getLogger(__name__)

KEY_VARIABLE = "NUMPROTECT_PAGE_TOKEN_KEY"
MIN_KEY_BYTES = 32
VERSION = 1
TAG_BYTES = 16
_MAX_FIELD_BYTES = 0xFFFF
_DOMAIN = b"numprotect.page_token"


class PageTokenKey:
    """The secret page tokens are signed with. Its repr never shows the secret."""

    def __init__(self, secret: bytes, *, ephemeral: bool = False) -> None:
        if len(secret) < MIN_KEY_BYTES:
            raise ValueError(f"a page-token key needs at least {MIN_KEY_BYTES} bytes")
        self._secret = secret
        # True when drawn at random by this process (NUMPROTECT_PAGE_TOKEN_KEY unset).
        self.ephemeral = ephemeral

    @classmethod
    def random(cls) -> PageTokenKey:
        return cls(secrets.token_bytes(MIN_KEY_BYTES), ephemeral=True)

    @classmethod
    def from_env(cls, env: Env) -> PageTokenKey:
        """NUMPROTECT_PAGE_TOKEN_KEY, validated (SettingsError, without echoing the secret); unset: random + warning."""
        raw = env.raw(KEY_VARIABLE)
        if raw is None:
            log.warning(
                "NUMPROTECT_PAGE_TOKEN_KEY is not set: page tokens are signed with a random key of this process "
                "and only continue a listing against this same process; set one key for every replica"
            )
            return cls.random()
        text = raw.strip().replace("-", "+").replace("_", "/")
        try:
            secret = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise SettingsError(f"{KEY_VARIABLE}: must be base64 (e.g. openssl rand -base64 32)") from None
        if len(secret) < MIN_KEY_BYTES:
            raise SettingsError(
                f"{KEY_VARIABLE}: must decode to at least {MIN_KEY_BYTES} bytes ({len(secret)} given); "
                "e.g. openssl rand -base64 32"
            )
        return cls(secret)

    def sign(self, message: bytes) -> bytes:
        return hmac.new(self._secret, message, hashlib.sha256).digest()[:TAG_BYTES]

    def __repr__(self) -> str:
        return f"PageTokenKey(ephemeral={self.ephemeral})"


def _pack(fields: Sequence[str]) -> bytes:
    out = bytearray()
    for field in fields:
        data = field.encode()
        if len(data) > _MAX_FIELD_BYTES:
            raise ValueError(f"page-token field of {len(data)} bytes (at most {_MAX_FIELD_BYTES})")
        out += len(data).to_bytes(2, "big") + data
    return bytes(out)


def _unpack(data: bytes) -> list[str] | None:
    fields: list[str] = []
    at = 0
    while at < len(data):
        if at + 2 > len(data):
            return None
        size = int.from_bytes(data[at : at + 2], "big")
        at += 2
        if at + size > len(data):
            return None
        try:
            fields.append(data[at : at + size].decode())
        except UnicodeDecodeError:
            return None
        at += size
    return fields


class PageTokens:
    """The page tokens of one listing (e.g. "cdr.ListCdrs"): `encode` the next position, `decode` a request's."""

    def __init__(self, key: PageTokenKey, listing: str, *, field: str = "page_token") -> None:
        self.key = key
        self.listing = listing
        self.field = field
        self._context = _pack([listing])
        self.rule = (
            f"is not a next_page_token of {listing} for these filters "
            "(tokens are signed and bound to the query; start again without one)"
        )

    def _tag(self, version: int, query: Sequence[str], cursor: bytes) -> bytes:
        query_digest = hashlib.sha256(_pack(query)).digest()
        return self.key.sign(_DOMAIN + bytes([version]) + self._context + query_digest + cursor)

    def encode(self, cursor: Sequence[str], *, query: Sequence[str]) -> str:
        """The token that continues after `cursor`, valid only for a request with the same `query` fields."""
        body = _pack(cursor)
        raw = bytes([VERSION]) + body + self._tag(VERSION, query, body)
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def decode(self, token: str, *, query: Sequence[str], fields: int) -> list[str]:
        """The cursor fields of a token this listing issued for `query`; anything else is INVALID_ARGUMENT."""
        try:
            raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            raise self._refused() from None
        if len(raw) < 1 + TAG_BYTES or raw[0] != VERSION:
            raise self._refused()
        body, tag = raw[1:-TAG_BYTES], raw[-TAG_BYTES:]
        if not hmac.compare_digest(tag, self._tag(VERSION, query, body)):
            raise self._refused()
        cursor = _unpack(body)
        if cursor is None or len(cursor) != fields:
            raise self._refused()
        return cursor

    def _refused(self) -> InvalidArgument:
        return InvalidArgument.field(self.field, self.rule)
