"""Page tokens: round trip, bound to listing, query and key; edits and foreign tokens are INVALID_ARGUMENT;
the key setting is validated at start-up and an unset key is a random one with one warning."""

from __future__ import annotations

import base64
import logging

import pytest

from numprotect.core.errors import InvalidArgument
from numprotect.core.page_tokens import KEY_VARIABLE, TAG_BYTES, PageTokenKey, PageTokens
from numprotect.core.settings import Env, SettingsError

KEY = PageTokenKey(b"k" * 32)
QUERY = ["t1", "0", "b1", "", "1764000000000", ""]


def _refused(tokens: PageTokens, token: str, query: list[str] = QUERY, fields: int = 2) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        tokens.decode(token, query=query, fields=fields)
    [violation] = caught.value.violations
    assert violation.field == "page_token"
    assert violation.description == tokens.rule
    return caught.value


@pytest.mark.parametrize("cursor", [["1764000000000", "1764000000000-3"], ["", "é|,\x1f"], ["x" * 500, "0-0"]])
def test_round_trip_is_urlsafe_base64_without_padding(cursor: list[str]) -> None:
    tokens = PageTokens(KEY, "cdr.ListCdrs")
    token = tokens.encode(cursor, query=QUERY)
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert tokens.decode(token, query=QUERY, fields=2) == cursor
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert raw[0] == 1 and len(raw) == 1 + sum(2 + len(c.encode()) for c in cursor) + TAG_BYTES


def test_a_token_only_continues_its_own_query_listing_and_key() -> None:
    tokens = PageTokens(KEY, "cdr.ListCdrs")
    token = tokens.encode(["1", "1-0"], query=QUERY)
    _refused(tokens, token, query=["t2", *QUERY[1:]])  # another tenant
    _refused(tokens, token, query=[*QUERY[:2], "b2", *QUERY[3:]])  # another filter
    _refused(tokens, token, query=QUERY[:-1])  # one filter fewer
    _refused(PageTokens(KEY, "allocation.ListNumberHistory"), token)  # another listing
    _refused(PageTokens(PageTokenKey(b"o" * 32), "cdr.ListCdrs"), token)  # another deployment's key
    _refused(tokens, token, fields=3)


def test_every_edited_byte_is_refused() -> None:
    tokens = PageTokens(KEY, "binding.ListBindings")
    raw = base64.urlsafe_b64decode(tokens.encode(["b" + "0" * 22], query=["t1"]) + "==")
    for index in range(len(raw)):
        edited = bytearray(raw)
        edited[index] ^= 0x01
        _refused(tokens, base64.urlsafe_b64encode(bytes(edited)).decode().rstrip("="), query=["t1"], fields=1)


@pytest.mark.parametrize("garbage", ["garbage!", "x", "", "====", "AQ", "a b", "AQ" * 40])
def test_garbage_is_refused_with_the_rule(garbage: str) -> None:
    error = _refused(PageTokens(KEY, "cdr.ListCdrs"), garbage)
    assert "cdr.ListCdrs" in error.message


def test_an_unknown_version_is_refused() -> None:
    tokens = PageTokens(KEY, "cdr.ListCdrs")
    raw = bytearray(base64.urlsafe_b64decode(tokens.encode(["1", "2"], query=QUERY) + "=="))
    raw[0] = 2
    _refused(tokens, base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("="))


def test_key_from_env_accepts_standard_and_urlsafe_base64() -> None:
    secret = bytes(range(200, 240))
    for encoded in (base64.b64encode(secret).decode(), base64.urlsafe_b64encode(secret).decode().rstrip("=")):
        key = PageTokenKey.from_env(Env({KEY_VARIABLE: encoded}))
        assert not key.ephemeral
        token = PageTokens(key, "l").encode(["1"], query=[])
        assert PageTokens(PageTokenKey(secret), "l").decode(token, query=[], fields=1) == ["1"]


@pytest.mark.parametrize(
    ("value", "rule"),
    [("not base64 !", "must be base64"), (base64.b64encode(b"x" * 31).decode(), "at least 32 bytes")],
)
def test_bad_key_setting_is_one_line_naming_the_variable_not_the_secret(value: str, rule: str) -> None:
    with pytest.raises(SettingsError) as caught:
        PageTokenKey.from_env(Env({KEY_VARIABLE: value}))
    text = str(caught.value)
    assert text.startswith(KEY_VARIABLE) and rule in text and "\n" not in text
    assert value not in text


def test_unset_key_is_random_per_process_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="numprotect.core.page_tokens"):
        first = PageTokenKey.from_env(Env({}))
    warnings = [r for r in caplog.records if r.name == "numprotect.core.page_tokens"]
    assert len(warnings) == 1 and "same process" in warnings[0].getMessage()
    second = PageTokenKey.random()
    assert first.ephemeral and second.ephemeral
    token = PageTokens(first, "l").encode(["1"], query=[])
    assert PageTokens(first, "l").decode(token, query=[], fields=1) == ["1"]
    _refused(PageTokens(second, "l"), token, query=[], fields=1)
    assert "k" * 4 not in repr(KEY) and repr(first) == "PageTokenKey(ephemeral=True)"
